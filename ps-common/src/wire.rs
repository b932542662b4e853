//! The wire codec for row values: little-endian `f32`, row after row.

use bytes::{Bytes, BytesMut};

use crate::error::PsError;

/// Encodes floats as little-endian bytes.
pub fn encode_f32s(values: &[f32]) -> Bytes {
    let mut out = BytesMut::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.freeze()
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
    for (chunk, v) in bytes.chunks_exact(4).zip(out.iter_mut()) {
        *v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    Ok(())
}

/// Decodes little-endian bytes into a new vector; the length must be a multiple of 4.
pub fn decode_f32s(bytes: &[u8]) -> Result<Vec<f32>, PsError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(PsError::invalid(format!(
            "value bytes must be a multiple of 4 (little-endian f32), got {}",
            bytes.len()
        )));
    }
    let mut out = vec![0f32; bytes.len() / 4];
    decode_f32s_into(bytes, &mut out)?;
    Ok(out)
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
    fn ragged_or_mismatched_lengths_are_errors() {
        assert!(decode_f32s(&[0u8; 5]).is_err());
        let mut out = [0f32; 2];
        assert!(decode_f32s_into(&[0u8; 4], &mut out).is_err());
    }
}
