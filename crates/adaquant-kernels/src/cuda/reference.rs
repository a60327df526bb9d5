//! Scalar host twins of the CUDA kernels, written straight from the layout rules in [`crate::format`]: what every
//! GPU result is compared against (packing bit for bit, attention to a relative tolerance).
//!
//! Quantization follows the exact semantics of the design: per group, the stored minimum is the group minimum
//! rounded toward minus infinity to the metadata type, and the stored scale is (max - stored minimum) /
//! (levels - 1) rounded up (the covering pair of [`crate::quant`], computed here by the crate's reference formula,
//! not by the fast path the kernels mirror); codes are clamp(round((x - min) / scale), 0, levels - 1) computed with
//! the stored values, and code 0 when the stored scale is zero; reconstruction is min + code * scale.

use half::f16;

use crate::error::{Error, Result};
use crate::format::{Bits, GroupAxis, MetaDtype, QuantSpec};

/// One quantized stream of one KV head: packed codes and the stored scale and minimum of every group (as f32
/// values; exactly representable in f16 when the metadata is f16).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedStream {
    pub codes: Vec<u8>,
    pub scale: Vec<f32>,
    pub min: Vec<f32>,
}

/// Stream position of (token `t`, channel `c`) in a stream whose token 0 starts a group block.
pub fn stream_index(t: usize, c: usize, head_dim: usize, axis: GroupAxis, group: usize) -> usize {
    match axis {
        GroupAxis::PerToken => t * head_dim + c,
        GroupAxis::PerChannel => (t / group) * group * head_dim + c * group + t % group,
    }
}

/// Writes code `code` at stream position `e` (the stream starts zeroed; each position is written once).
pub fn put_code(stream: &mut [u8], e: usize, code: u8, bits: Bits) {
    if bits == Bits::B1_58 {
        let p3 = [1u8, 3, 9, 27, 81][e % 5];
        stream[e / 5] += code * p3;
        return;
    }
    let b = bits.nominal() as usize;
    let bit = e * b;
    let v = u16::from(code) << (bit % 8);
    stream[bit / 8] |= v as u8;
    if bit % 8 + b > 8 {
        stream[bit / 8 + 1] |= (v >> 8) as u8;
    }
}

/// Reads the code at stream position `e`.
pub fn get_code(stream: &[u8], e: usize, bits: Bits) -> u8 {
    if bits == Bits::B1_58 {
        let p3 = [1u8, 3, 9, 27, 81][e % 5];
        return (stream[e / 5] / p3) % 3;
    }
    let b = bits.nominal() as usize;
    let bit = e * b;
    let lo = u16::from(stream[bit / 8]);
    let hi = if bit % 8 + b > 8 { u16::from(stream[bit / 8 + 1]) } else { 0 };
    (((lo | (hi << 8)) >> (bit % 8)) & ((1u16 << b) - 1)) as u8
}

/// The value a metadata entry holds once stored.
pub fn stored_meta(x: f32, meta: MetaDtype) -> f32 {
    match meta {
        MetaDtype::F16 => f16::from_f32(x).to_f32(),
        MetaDtype::F32 => x,
    }
}

/// The code of `x` in a group with stored minimum `mn` and stored scale `sc`.
pub fn quant_code(x: f32, mn: f32, sc: f32, bits: Bits) -> u8 {
    if sc.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return 0;
    }
    ((x - mn) / sc).round().clamp(0.0, f32::from(bits.max_code())) as u8
}

/// Checks a block shape for a spec: `x.len() == tokens * head_dim`, the group divides its axis.
pub fn check_block(spec: &QuantSpec, x_len: usize, tokens: usize, head_dim: usize) -> Result<()> {
    spec.validate(head_dim)?;
    if x_len != tokens * head_dim {
        return Err(Error::ShapeMismatch { what: "block to quantize", expected: tokens * head_dim, got: x_len });
    }
    if spec.axis == GroupAxis::PerChannel && !tokens.is_multiple_of(spec.group) {
        return Err(Error::GroupDoesNotDivide { group: spec.group, len: tokens, what: "tokens", axis: spec.axis });
    }
    Ok(())
}

/// Quantizes a token-major [tokens][head_dim] block of one head into a packed stream.
pub fn quantize_ref(x: &[f32], tokens: usize, head_dim: usize, spec: &QuantSpec) -> Result<PackedStream> {
    check_block(spec, x.len(), tokens, head_dim)?;
    if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite { what: "block to quantize", index, value });
    }
    let n = tokens * head_dim;
    let g = spec.group;
    let mut ordered = vec![0f32; n];
    for t in 0..tokens {
        for c in 0..head_dim {
            ordered[stream_index(t, c, head_dim, spec.axis, g)] = x[t * head_dim + c];
        }
    }
    let mut out = PackedStream {
        codes: vec![0u8; spec.bits.packed_bytes(n)],
        scale: Vec::with_capacity(n / g),
        min: Vec::with_capacity(n / g),
    };
    for (gi, grp) in ordered.chunks(g).enumerate() {
        let mn = grp.iter().copied().fold(f32::INFINITY, f32::min);
        let mx = grp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (sc, mn) =
            crate::quant::reference::covering_params_ref(spec.meta, (spec.bits.levels() - 1) as f32, mn, mx)?;
        out.scale.push(sc);
        out.min.push(mn);
        for (k, &v) in grp.iter().enumerate() {
            put_code(&mut out.codes, gi * g + k, quant_code(v, mn, sc, spec.bits), spec.bits);
        }
    }
    Ok(out)
}

/// Dequantizes a packed stream back into a token-major [tokens][head_dim] block.
pub fn dequantize_ref(p: &PackedStream, tokens: usize, head_dim: usize, spec: &QuantSpec) -> Vec<f32> {
    let mut out = vec![0f32; tokens * head_dim];
    for t in 0..tokens {
        for c in 0..head_dim {
            let e = stream_index(t, c, head_dim, spec.axis, spec.group);
            let gi = e / spec.group;
            out[t * head_dim + c] = p.min[gi] + f32::from(get_code(&p.codes, e, spec.bits)) * p.scale[gi];
        }
    }
    out
}

/// Decode attention of one sequence in f64: `q` is [n_q_heads][head_dim], `k` and `v` are
/// [n_kv_heads][tokens][head_dim]; query head h reads KV head h / (n_q_heads / n_kv_heads).
/// Returns [n_q_heads][head_dim].
pub fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    sm_scale: f32,
) -> Vec<f32> {
    let tokens = k.len() / (n_kv_heads * head_dim);
    let gqa = n_q_heads / n_kv_heads;
    let mut out = vec![0f32; n_q_heads * head_dim];
    for h in 0..n_q_heads {
        let kv = h / gqa;
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        let scores: Vec<f64> = (0..tokens)
            .map(|t| {
                let kt = &k[(kv * tokens + t) * head_dim..][..head_dim];
                qh.iter().zip(kt).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * f64::from(sm_scale)
            })
            .collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let l: f64 = p.iter().sum();
        for c in 0..head_dim {
            let acc: f64 = (0..tokens).map(|t| p[t] * f64::from(v[(kv * tokens + t) * head_dim + c])).sum();
            out[h * head_dim + c] = (acc / l) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| 0.1 + 2.0 * ((i as f32) * 0.37 + seed as f32).cos()).collect()
    }

    #[test]
    fn codes_round_trip_at_every_position_and_width() {
        for bits in Bits::ALL {
            let n = 203;
            let mut s = vec![0u8; bits.packed_bytes(n)];
            let codes: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % bits.levels() as usize) as u8).collect();
            for (e, &c) in codes.iter().enumerate() {
                put_code(&mut s, e, c, bits);
            }
            for (e, &c) in codes.iter().enumerate() {
                assert_eq!(get_code(&s, e, bits), c, "{bits} at {e}");
            }
        }
    }

    #[test]
    fn stream_bytes_follow_the_format() {
        // 3-bit codes 1..8 of one unit, LSB first: 0b001, 0b010, ... packed into 3 bytes.
        let mut s = vec![0u8; 3];
        for e in 0..8 {
            put_code(&mut s, e, (e + 1) as u8 & 7, Bits::B3);
        }
        let word = u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16;
        for e in 0..8 {
            assert_eq!((word >> (3 * e)) & 7, (e as u32 + 1) & 7);
        }
        let mut t = vec![0u8; 1];
        for (e, c) in [2u8, 0, 1, 2, 1].iter().enumerate() {
            put_code(&mut t, e, *c, Bits::B1_58);
        }
        assert_eq!(t[0], 2 + 9 + 2 * 27 + 81);
    }

    #[test]
    fn quantize_round_trip_error_is_within_half_a_step() {
        for bits in Bits::ALL {
            for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
                let spec = QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(bits, 32, axis) };
                let (t, d) = (64, 64);
                let x = data(t * d, 3);
                let p = quantize_ref(&x, t, d, &spec).unwrap();
                assert_eq!(p.codes.len() + 8 * p.scale.len(), spec.bytes(t, 1, d));
                let y = dequantize_ref(&p, t, d, &spec);
                for tt in 0..t {
                    for c in 0..d {
                        let gi = stream_index(tt, c, d, axis, 32) / 32;
                        let err = (x[tt * d + c] - y[tt * d + c]).abs();
                        assert!(err <= 0.5 * p.scale[gi] * 1.0001 + 1e-6, "{bits} {axis}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn constant_group_reconstructs_exactly_and_bad_input_is_an_error() {
        let spec = QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken);
        let x = vec![0.5f32; 64];
        let p = quantize_ref(&x, 1, 64, &spec).unwrap();
        assert_eq!(dequantize_ref(&p, 1, 64, &spec), x);
        let mut bad = x.clone();
        bad[7] = f32::NAN;
        assert!(matches!(quantize_ref(&bad, 1, 64, &spec), Err(Error::NonFinite { index: 7, .. })));
        let pc = QuantSpec::new(Bits::B2, 64, GroupAxis::PerChannel);
        assert!(matches!(quantize_ref(&x, 1, 64, &pc), Err(Error::GroupDoesNotDivide { .. })));
        assert!(matches!(quantize_ref(&x[..63], 1, 64, &spec), Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn attention_of_identical_keys_averages_values() {
        let (hq, hkv, d, t) = (4, 2, 8, 5);
        let q = data(hq * d, 1);
        let k = vec![0.25f32; hkv * t * d];
        let v: Vec<f32> = (0..hkv * t * d).map(|i| (i / d % t) as f32).collect();
        let o = attention_ref(&q, &k, &v, hq, hkv, d, 0.3);
        for x in o {
            assert!((x - 2.0).abs() < 1e-6, "{x}");
        }
    }
}
