//! The wire codecs: row values as little-endian `f32`, `f16` or `bf16`, row
//! after row; key lists as plain varints (protobuf's packed `uint64`) or
//! sorted with delta + varint encoding.
//!
//! On a little-endian machine (every one this runs on) a float's memory is
//! already its `f32` encoding: encoding and decoding `f32` are copies of
//! bytes, a vector of floats becomes a message's bytes without a copy
//! ([`values_into_bytes`]), and a message's aligned bytes are read as
//! floats where they lie ([`values_view`]).

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use half::{bf16, f16};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::PsError;
use crate::pb::ValueEncoding;

/// Bytes per value in `encoding`.
pub fn value_bytes(encoding: ValueEncoding) -> usize {
    match encoding {
        ValueEncoding::F32 => 4,
        ValueEncoding::F16 | ValueEncoding::Bf16 => 2,
    }
}

/// Whether values of `encoding` are laid out as this machine holds floats
/// (`f32` on a little-endian machine): encoding them is a byte copy, or
/// none at all.
fn in_memory_layout(encoding: ValueEncoding) -> bool {
    encoding == ValueEncoding::F32 && cfg!(target_endian = "little")
}

/// Encodes floats in `encoding`. `f16` saturates at +-65504 (the largest
/// finite half), so a finite value never becomes infinite on the wire.
pub fn encode_values(values: &[f32], encoding: ValueEncoding) -> Bytes {
    let mut out = BytesMut::with_capacity(values.len() * value_bytes(encoding));
    append_values(&mut out, values, encoding);
    out.freeze()
}

/// `values` encoded in `encoding`, taking the vector: `f32` values become
/// the message's bytes as they are (the bytes own the vector), so the
/// in-process link hands a shard the very floats the worker computed.
pub fn values_into_bytes(values: Vec<f32>, encoding: ValueEncoding) -> Bytes {
    if in_memory_layout(encoding) {
        Bytes::from_owner(LittleEndianF32s(values))
    } else {
        encode_values(&values, encoding)
    }
}

/// Floats owned by a [`Bytes`] as their little-endian encoding (only built
/// on a little-endian machine).
struct LittleEndianF32s(Vec<f32>);

impl AsRef<[u8]> for LittleEndianF32s {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// The values `bytes` of `encoding` carry: borrowed in place when they are
/// `f32` bytes aligned for floats (a request built in this process, or one
/// that happened to land aligned in the receive buffer), decoded otherwise.
pub fn values_view(bytes: &[u8], encoding: ValueEncoding) -> Result<Cow<'_, [f32]>, PsError> {
    if in_memory_layout(encoding)
        && let Ok(values) = <[f32]>::ref_from_bytes(bytes)
    {
        return Ok(Cow::Borrowed(values));
    }
    decode_values(bytes, encoding).map(Cow::Owned)
}

/// Appends `values` encoded in `encoding` to `out` (see [`encode_values`]).
pub fn append_values(out: &mut BytesMut, values: &[f32], encoding: ValueEncoding) {
    if in_memory_layout(encoding) {
        out.extend_from_slice(values.as_bytes());
        return;
    }
    let start = out.len();
    out.resize(start + values.len() * value_bytes(encoding), 0);
    write_values(&mut out[start..], values, encoding);
}

/// Encodes `values` at byte `at` of `out`, which holds everything before
/// `at` (or more, when the values fill a gap left earlier): values handed
/// over in order are appended, late ones fill their gap.
pub fn place_values(out: &mut BytesMut, at: usize, values: &[f32], encoding: ValueEncoding) {
    if out.len() < at {
        out.resize(at, 0);
    }
    if out.len() == at {
        append_values(out, values, encoding);
    } else {
        let end = at + values.len() * value_bytes(encoding);
        write_values(&mut out[at..end], values, encoding);
    }
}

/// Encodes `values` in `encoding` into `out`, which holds exactly
/// `values.len() * value_bytes(encoding)` bytes (a row's place in a
/// response built out of order).
pub fn write_values(out: &mut [u8], values: &[f32], encoding: ValueEncoding) {
    match encoding {
        _ if in_memory_layout(encoding) => {
            out.copy_from_slice(values.as_bytes());
        }
        ValueEncoding::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        ValueEncoding::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                let v = if v.is_nan() {
                    v
                } else {
                    v.clamp(-65504.0, 65504.0)
                };
                o.copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        ValueEncoding::Bf16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        }
    }
}

/// Decodes `bytes` of `encoding` into `out`, which must hold exactly the
/// number of values the bytes carry.
pub fn decode_values_into(
    bytes: &[u8],
    encoding: ValueEncoding,
    out: &mut [f32],
) -> Result<(), PsError> {
    let width = value_bytes(encoding);
    if bytes.len() != out.len() * width {
        return Err(PsError::invalid(format!(
            "expected {} bytes of {} ({} values), got {} bytes",
            out.len() * width,
            encoding.as_str_name(),
            out.len(),
            bytes.len()
        )));
    }
    match encoding {
        ValueEncoding::F32 => decode_f32s_into(bytes, out)?,
        ValueEncoding::F16 => {
            for (chunk, v) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                *v = f16::from_le_bytes([chunk[0], chunk[1]]).to_f32();
            }
        }
        ValueEncoding::Bf16 => {
            for (chunk, v) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                *v = bf16::from_le_bytes([chunk[0], chunk[1]]).to_f32();
            }
        }
    }
    Ok(())
}

/// Decodes `bytes` of `encoding` into a new vector.
pub fn decode_values(bytes: &[u8], encoding: ValueEncoding) -> Result<Vec<f32>, PsError> {
    let width = value_bytes(encoding);
    if !bytes.len().is_multiple_of(width) {
        return Err(PsError::invalid(format!(
            "value bytes must be a multiple of {width} ({}), got {}",
            encoding.as_str_name(),
            bytes.len()
        )));
    }
    let mut out = vec![0f32; bytes.len() / width];
    decode_values_into(bytes, encoding, &mut out)?;
    Ok(out)
}

/// Delta + varint encoding of non-decreasing `keys`: the first key, then
/// each gap to the previous key, as unsigned LEB128 varints.
pub fn encode_delta_keys(keys: &[u64]) -> Result<Bytes, PsError> {
    let mut out = BytesMut::with_capacity(keys.len() * 3);
    let mut previous = 0u64;
    for &key in keys {
        let gap = key.checked_sub(previous).ok_or_else(|| {
            PsError::invalid(format!(
                "delta-encoded keys must not decrease ({key} after {previous})"
            ))
        })?;
        let mut v = gap;
        while v >= 0x80 {
            out.extend_from_slice(&[(v as u8) | 0x80]);
            v >>= 7;
        }
        out.extend_from_slice(&[v as u8]);
        previous = key;
    }
    Ok(out.freeze())
}

/// Decodes [`encode_delta_keys`] output, refusing more than `max_keys`
/// keys before materializing them (a request's key limit).
pub fn decode_delta_keys(bytes: &[u8], max_keys: usize) -> Result<Vec<u64>, PsError> {
    let mut keys = Vec::new();
    let (mut previous, mut value, mut shift) = (0u64, 0u64, 0u32);
    for (i, &b) in bytes.iter().enumerate() {
        if shift >= 64 || (shift == 63 && b > 1) {
            return Err(PsError::invalid(format!(
                "delta_keys: varint longer than 64 bits at byte {i}"
            )));
        }
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 != 0 {
            shift += 7;
            continue;
        }
        if keys.len() == max_keys {
            return Err(PsError::ResourceExhausted(format!(
                "delta_keys holds more than this shard's limit of {max_keys} keys per request"
            )));
        }
        previous = previous.checked_add(value).ok_or_else(|| {
            PsError::invalid(format!("delta_keys: key overflows 64 bits at byte {i}"))
        })?;
        keys.push(previous);
        (value, shift) = (0, 0);
    }
    if shift != 0 {
        return Err(PsError::invalid("delta_keys ends inside a varint"));
    }
    Ok(keys)
}

/// Encodes floats as little-endian bytes.
pub fn encode_f32s(values: &[f32]) -> Bytes {
    encode_values(values, ValueEncoding::F32)
}

/// Decodes little-endian bytes into `out`, which must hold exactly `bytes.len() / 4` floats.
pub fn decode_f32s_into(bytes: &[u8], out: &mut [f32]) -> Result<(), PsError> {
    if bytes.len() != out.len() * 4 {
        return Err(PsError::invalid(format!(
            "expected {} bytes of little-endian f32 ({} values), got {} bytes",
            out.len() * 4,
            out.len(),
            bytes.len()
        )));
    }
    if in_memory_layout(ValueEncoding::F32) {
        out.as_mut_bytes().copy_from_slice(bytes);
    } else {
        for (chunk, v) in bytes.chunks_exact(4).zip(out.iter_mut()) {
            *v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
    }
    Ok(())
}

/// Decodes little-endian bytes into a new vector; the length must be a multiple of 4.
pub fn decode_f32s(bytes: &[u8]) -> Result<Vec<f32>, PsError> {
    decode_values(bytes, ValueEncoding::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip_bit_exactly() {
        let values = [
            0.0,
            -0.0,
            1.5,
            f32::MIN_POSITIVE,
            f32::MAX,
            -3.25e-7,
            f32::NAN,
        ];
        let back = decode_f32s(&encode_f32s(&values)).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        assert_eq!(
            &encode_f32s(&[1.0])[..],
            &[0x00, 0x00, 0x80, 0x3f],
            "little-endian"
        );
    }

    #[test]
    fn f32_values_become_bytes_and_are_read_back_in_place_where_aligned() {
        let values = vec![1.0, -2.5, f32::MIN_POSITIVE, f32::NAN, 3e38];
        let bytes = values_into_bytes(values.clone(), ValueEncoding::F32);
        assert_eq!(bytes, encode_f32s(&values), "the same bytes as the codec");
        let view = values_view(&bytes, ValueEncoding::F32).unwrap();
        assert!(
            matches!(view, Cow::Borrowed(_)),
            "aligned bytes are borrowed"
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&view), bits(&values));
        // The same bytes one byte into a buffer are not aligned for floats:
        // decoded instead, to the same values.
        let mut shifted = BytesMut::from(&[0u8][..]);
        shifted.extend_from_slice(&bytes);
        let shifted = shifted.freeze().slice(1..);
        let view = values_view(&shifted, ValueEncoding::F32).unwrap();
        assert!(matches!(view, Cow::Owned(_)), "unaligned bytes are decoded");
        assert_eq!(bits(&view), bits(&values));
        let halves = values_into_bytes(values.clone(), ValueEncoding::Bf16);
        assert_eq!(halves.len(), 10);
        assert!(matches!(
            values_view(&halves, ValueEncoding::Bf16).unwrap(),
            Cow::Owned(_)
        ));
        assert!(values_view(&shifted[..3], ValueEncoding::F32).is_err());
    }

    #[test]
    fn rows_placed_in_any_order_encode_as_rows_appended_in_order() {
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|r| vec![r as f32, -0.5 * r as f32, 1e-3])
            .collect();
        for encoding in [ValueEncoding::F32, ValueEncoding::F16, ValueEncoding::Bf16] {
            let mut in_order = BytesMut::new();
            for row in &rows {
                append_values(&mut in_order, row, encoding);
            }
            // Rows 2 and 5 come late, as rows a pull creates do.
            let row_bytes = 3 * value_bytes(encoding);
            let mut placed = BytesMut::new();
            for r in [0, 1, 3, 4, 2, 5] {
                place_values(&mut placed, r * row_bytes, &rows[r], encoding);
            }
            assert_eq!(placed, in_order, "{encoding:?}");
        }
    }

    #[test]
    fn half_encodings_round_within_their_precision_and_f16_saturates() {
        let values = [0.0f32, 1.0, -2.5, 1e-3, 2.71, 70000.0, -1e9];
        let f16 = decode_values(
            &encode_values(&values, ValueEncoding::F16),
            ValueEncoding::F16,
        )
        .unwrap();
        let bf16 = decode_values(
            &encode_values(&values, ValueEncoding::Bf16),
            ValueEncoding::Bf16,
        )
        .unwrap();
        assert_eq!(encode_values(&values, ValueEncoding::F16).len(), 14);
        for i in 0..5 {
            let (v, h, b) = (values[i], f16[i], bf16[i]);
            assert!((h - v).abs() <= v.abs() * 1e-3 + 1e-7, "f16 {v} -> {h}");
            assert!((b - v).abs() <= v.abs() * 4e-3 + 1e-7, "bf16 {v} -> {b}");
        }
        assert_eq!(&f16[5..], &[65504.0, -65504.0], "saturated, not infinite");
        assert!(
            (bf16[6] / -1e9 - 1.0).abs() < 4e-3,
            "bf16 keeps the f32 range"
        );
        assert!(decode_values(&[0u8; 3], ValueEncoding::F16).is_err());
    }

    #[test]
    fn delta_keys_round_trip_and_are_smaller_than_the_keys() {
        let keys = [3u64, 3, 10, 1000, 1_000_000, u64::MAX];
        let bytes = encode_delta_keys(&keys).unwrap();
        assert_eq!(decode_delta_keys(&bytes, 100).unwrap(), keys);
        let dense: Vec<u64> = (1_000_000..1_001_000).collect();
        assert_eq!(encode_delta_keys(&dense).unwrap().len(), 3 + 999);
        assert!(encode_delta_keys(&[5, 4]).is_err(), "decreasing");
    }

    /// Bounded fuzzing: random bytes into every decoder never panic, and
    /// what decodes respects the key limit and re-encodes to the same bytes.
    #[test]
    fn random_bytes_never_panic_a_decoder() {
        let mut rng = crate::init::RowRng::new(7, 0);
        for _ in 0..20_000 {
            let len = (rng.next_u64() % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if let Ok(keys) = decode_delta_keys(&bytes, 4) {
                assert!(keys.len() <= 4);
                assert!(keys.is_sorted());
                let canonical = encode_delta_keys(&keys).unwrap();
                assert_eq!(decode_delta_keys(&canonical, 4).unwrap(), keys);
            }
            for encoding in [ValueEncoding::F32, ValueEncoding::F16, ValueEncoding::Bf16] {
                if let Ok(values) = decode_values(&bytes, encoding) {
                    assert_eq!(values.len() * value_bytes(encoding), bytes.len());
                }
            }
        }
    }

    #[test]
    fn malformed_delta_keys_are_refused() {
        assert!(
            decode_delta_keys(&[0x80], 10).is_err(),
            "ends inside a varint"
        );
        assert!(
            decode_delta_keys(&[0xff; 11], 10).is_err(),
            "longer than 64 bits"
        );
        let max = encode_delta_keys(&[u64::MAX]).unwrap();
        let overflow = [max.to_vec(), vec![1]].concat();
        assert!(decode_delta_keys(&overflow, 10).is_err(), "overflows");
        let many = encode_delta_keys(&[1, 2, 3]).unwrap();
        assert!(matches!(
            decode_delta_keys(&many, 2),
            Err(PsError::ResourceExhausted(_))
        ));
    }

    #[test]
    fn ragged_or_mismatched_lengths_are_errors() {
        assert!(decode_f32s(&[0u8; 5]).is_err());
        let mut out = [0f32; 2];
        assert!(decode_f32s_into(&[0u8; 4], &mut out).is_err());
    }
}

/// Properties of the codecs over generated inputs (proptest).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const ENCODINGS: [ValueEncoding; 3] =
        [ValueEncoding::F32, ValueEncoding::F16, ValueEncoding::Bf16];

    proptest! {
        #[test]
        fn sorted_keys_survive_delta_encoding(mut keys in vec(any::<u64>(), 0..300)) {
            keys.sort_unstable();
            let bytes = encode_delta_keys(&keys).unwrap();
            prop_assert_eq!(decode_delta_keys(&bytes, keys.len()).unwrap(), keys);
        }

        #[test]
        fn unsorted_keys_are_refused_by_the_encoder(keys in vec(any::<u64>(), 2..50)) {
            prop_assume!(!keys.is_sorted());
            prop_assert!(encode_delta_keys(&keys).is_err());
        }

        #[test]
        fn any_bytes_decode_within_the_limit_or_fail(
            bytes in vec(any::<u8>(), 0..80),
            limit in 0usize..20,
        ) {
            if let Ok(keys) = decode_delta_keys(&bytes, limit) {
                prop_assert!(keys.len() <= limit);
                prop_assert!(keys.is_sorted());
            }
            for encoding in ENCODINGS {
                if let Ok(values) = decode_values(&bytes, encoding) {
                    prop_assert_eq!(values.len() * value_bytes(encoding), bytes.len());
                }
            }
        }

        #[test]
        fn finite_values_stay_finite_in_every_encoding(values in vec(-1e30f32..1e30, 0..64)) {
            for encoding in ENCODINGS {
                let decoded = decode_values(&encode_values(&values, encoding), encoding).unwrap();
                prop_assert_eq!(decoded.len(), values.len());
                prop_assert!(decoded.iter().all(|v| v.is_finite()), "{:?}", encoding);
            }
        }
    }
}
