//! Storage dtypes of safetensors and the exact f32 decode/encode of the editable ones.
//!
//! Edits are computed in f32: a stored F16/BF16 value is decoded exactly (every half value is
//! an f32), the deltas are added, and the sum is encoded once with round-to-nearest-even, the
//! same rounding as `torch.Tensor.to(torch.bfloat16)`.

use half::{bf16, f16};

/// A safetensors dtype tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit.
    U8,
    /// Signed 8-bit.
    I8,
    /// 8-bit float, E5M2.
    F8E5M2,
    /// 8-bit float, E4M3.
    F8E4M3,
    /// 8-bit float exponent only (E8M0).
    F8E8M0,
    /// Signed 16-bit.
    I16,
    /// Unsigned 16-bit.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit.
    I32,
    /// Unsigned 32-bit.
    U32,
    /// IEEE single precision.
    F32,
    /// Signed 64-bit.
    I64,
    /// Unsigned 64-bit.
    U64,
    /// IEEE double precision.
    F64,
}

impl Dtype {
    /// Parses the tag used in safetensors headers; `None` for tags rrome does not know.
    pub fn parse(tag: &str) -> Option<Dtype> {
        Some(match tag {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E8M0" => Dtype::F8E8M0,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    /// The tag as written in headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// Whether rrome can write rank-one edits into tensors of this dtype.
    pub fn is_editable(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decodes little-endian `bytes` of an editable dtype into `out` (exact).
///
/// # Panics
/// If `dtype` is not editable or the lengths disagree (callers validate both first).
pub fn decode_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    let size = dtype.size();
    assert_eq!(bytes.len(), out.len() * size, "decode_f32: length mismatch");
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        other => panic!("decode_f32: {other} is not editable"),
    }
}

/// Encodes `values` into little-endian `bytes`, rounding to nearest even for F16/BF16.
///
/// # Panics
/// If `dtype` is not editable or the lengths disagree.
pub fn encode_f32(dtype: Dtype, values: &[f32], bytes: &mut [u8]) {
    let size = dtype.size();
    assert_eq!(bytes.len(), values.len() * size, "encode_f32: length mismatch");
    match dtype {
        Dtype::F32 => {
            for (v, c) in values.iter().zip(bytes.chunks_exact_mut(4)) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (v, c) in values.iter().zip(bytes.chunks_exact_mut(2)) {
                c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (v, c) in values.iter().zip(bytes.chunks_exact_mut(2)) {
                c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        other => panic!("encode_f32: {other} is not editable"),
    }
}

/// Whether every encoded value of an editable dtype is finite (no Inf or NaN after rounding).
pub fn all_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    match dtype {
        Dtype::F32 => bytes.chunks_exact(4).all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        // Exponent all ones means Inf or NaN.
        Dtype::F16 => bytes.chunks_exact(2).all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 != 0x7c00),
        Dtype::BF16 => bytes.chunks_exact(2).all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 != 0x7f80),
        other => panic!("all_finite: {other} is not editable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for tag in [
            "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
            "I64", "U64", "F64",
        ] {
            assert_eq!(Dtype::parse(tag).unwrap().as_str(), tag);
        }
        assert_eq!(Dtype::parse("F128"), None);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even (1).
        let tie = 1.0f32 + 2f32.powi(-8);
        let mut b = [0u8; 2];
        encode_f32(Dtype::BF16, &[tie], &mut b);
        let mut back = [0f32];
        decode_f32(Dtype::BF16, &b, &mut back);
        assert_eq!(back[0], 1.0);
        // Slightly above the tie rounds up.
        encode_f32(Dtype::BF16, &[tie + 2f32.powi(-20)], &mut b);
        decode_f32(Dtype::BF16, &b, &mut back);
        assert_eq!(back[0], 1.0 + 2f32.powi(-7));
    }

    #[test]
    fn half_decode_is_exact() {
        let vals = [0.0f32, -0.0, 1.5, -65504.0, 6.1035156e-5];
        let mut b = vec![0u8; vals.len() * 2];
        encode_f32(Dtype::F16, &vals, &mut b);
        let mut back = vec![0f32; vals.len()];
        decode_f32(Dtype::F16, &b, &mut back);
        assert_eq!(back, vals);
    }
}
