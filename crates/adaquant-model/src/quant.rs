//! ggml tensor types and their dequantization to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` (ggml commit d99724f2): every block stores its scale(s) as f16
//! first, then the codes. Element `j` of a 32-element block with 4-bit codes sits in the low nibble of byte `j`
//! for `j < 16` and in the high nibble of byte `j - 16` otherwise. K-quants group 256 elements into a super-block.

use half::{bf16, f16};

/// Elements of a K-quant super-block.
pub const QK_K: usize = 256;

/// The ggml tensor types adaquant reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// The type of a ggml type id, or `None` for ids adaquant does not dequantize.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The name ggml gives a type id (also for ids adaquant does not support), for error messages.
    pub fn name_of_id(id: u32) -> &'static str {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
            "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of `n` elements, or `None` when `n` is not a whole number of blocks or the size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `src` (a whole number of blocks of `ty`) into `dst`, one element per output slot.
///
/// The caller guarantees `src.len() == ty.bytes_for(dst.len())`; that is checked in debug builds only because
/// every public path (the GGUF reader) validates sizes before it gets here.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(Some(src.len()), ty.bytes_for(dst.len()));
    let bb = ty.block_bytes();
    let be = ty.block_elems();
    match ty {
        GgmlType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (blk, out) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
                match ty {
                    GgmlType::Q4_0 => dequant_q4_0(blk, out),
                    GgmlType::Q4_1 => dequant_q4_1(blk, out),
                    GgmlType::Q5_0 => dequant_q5_0(blk, out),
                    GgmlType::Q5_1 => dequant_q5_1(blk, out),
                    GgmlType::Q8_0 => dequant_q8_0(blk, out),
                    GgmlType::Q4K => dequant_q4_k(blk, out),
                    GgmlType::Q5K => dequant_q5_k(blk, out),
                    GgmlType::Q6K => dequant_q6_k(blk, out),
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("handled above"),
                }
            }
        }
    }
}

/// `block_q4_0 { f16 d; u8 qs[16]; }`: x = (q - 8) * d.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1 { f16 d; f16 m; u8 qs[16]; }`: x = q * d + m.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16]; }`: bit `j` of `qh` is the fifth bit of element `j`; x = (q - 16) * d.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// `block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16]; }`: x = q * d + m.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((qs[j] & 0xF) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// `block_q8_0 { f16 d; i8 qs[32]; }`: x = q * d.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) packed in the 12 `scales` bytes of Q4_K and Q5_K.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }`: eight 32-element sub-blocks, each
/// x = d * sc * q - dmin * m; sub-blocks 2i and 2i+1 share bytes `32i..32i+32` of `qs` (low, then high nibbles).
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for i in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * i..32 * i + 32];
        for l in 0..32 {
            y[64 * i + l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[64 * i + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }`: like Q4_K, with the fifth bit of
/// element `l` of sub-block `s` in bit `s` of `qh[l]`.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for i in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * i..32 * i + 32];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * i)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * i + 1)) & 1) << 4;
            y[64 * i + l] = d1 * ((q[l] & 0xF) | h1) as f32 - m1;
            y[64 * i + 32 + l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }`: sixteen 16-element sub-blocks with signed 8-bit
/// scales, x = d * sc * (q - 32), the low four bits in `ql` and the high two in `qh`.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let yo = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            yo[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yo[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yo[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yo[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each block format is checked on hand-built blocks whose codes are chosen so every element has a distinct,
    //! predictable value, written element by element from the format's definition (not from the decoder).
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// Packs 32 4-bit codes the ggml way: element j < 16 in the low nibble of byte j, j >= 16 in the high one.
    fn pack_nibbles_32(codes: &[u8; 32]) -> [u8; 16] {
        let mut qs = [0u8; 16];
        for j in 0..16 {
            qs[j] = codes[j] | (codes[j + 16] << 4);
        }
        qs
    }

    fn run(ty: GgmlType, block: &[u8], n: usize) -> Vec<f32> {
        assert_eq!(block.len(), ty.bytes_for(n).unwrap());
        let mut out = vec![f32::NAN; n];
        dequantize(ty, block, &mut out);
        out
    }

    #[test]
    fn q4_0_hand_block() {
        let codes: [u8; 32] = std::array::from_fn(|j| (j * 7 % 16) as u8);
        let mut b = h(0.5).to_vec();
        b.extend(pack_nibbles_32(&codes));
        let y = run(GgmlType::Q4_0, &b, 32);
        for j in 0..32 {
            assert_eq!(y[j], (codes[j] as f32 - 8.0) * 0.5, "element {j}");
        }
    }

    #[test]
    fn q4_1_hand_block() {
        let codes: [u8; 32] = std::array::from_fn(|j| (15 - j % 16) as u8);
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.5));
        b.extend(pack_nibbles_32(&codes));
        let y = run(GgmlType::Q4_1, &b, 32);
        for j in 0..32 {
            assert_eq!(y[j], codes[j] as f32 * 0.25 - 1.5, "element {j}");
        }
    }

    fn q5_parts(codes: &[u8; 32]) -> ([u8; 4], [u8; 16]) {
        let mut qh = 0u32;
        let mut low = [0u8; 32];
        for j in 0..32 {
            low[j] = codes[j] & 0xF;
            qh |= ((codes[j] >> 4) as u32 & 1) << j;
        }
        (qh.to_le_bytes(), pack_nibbles_32(&low))
    }

    #[test]
    fn q5_0_hand_block() {
        let codes: [u8; 32] = std::array::from_fn(|j| (j * 11 % 32) as u8);
        let (qh, qs) = q5_parts(&codes);
        let mut b = h(2.0).to_vec();
        b.extend(qh);
        b.extend(qs);
        let y = run(GgmlType::Q5_0, &b, 32);
        for j in 0..32 {
            assert_eq!(y[j], (codes[j] as f32 - 16.0) * 2.0, "element {j}");
        }
    }

    #[test]
    fn q5_1_hand_block() {
        let codes: [u8; 32] = std::array::from_fn(|j| (31 - j) as u8);
        let (qh, qs) = q5_parts(&codes);
        let mut b = h(0.125).to_vec();
        b.extend(h(3.0));
        b.extend(qh);
        b.extend(qs);
        let y = run(GgmlType::Q5_1, &b, 32);
        for j in 0..32 {
            assert_eq!(y[j], codes[j] as f32 * 0.125 + 3.0, "element {j}");
        }
    }

    #[test]
    fn q8_0_hand_block() {
        let codes: [i8; 32] = std::array::from_fn(|j| (j as i32 * 9 - 128) as i8);
        let mut b = h(-0.5).to_vec();
        b.extend(codes.iter().map(|&c| c as u8));
        let y = run(GgmlType::Q8_0, &b, 32);
        for j in 0..32 {
            assert_eq!(y[j], codes[j] as f32 * -0.5, "element {j}");
        }
    }

    /// Packs eight 6-bit scales and mins into the 12 bytes Q4_K and Q5_K use.
    fn pack_scales_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
        let mut q = [0u8; 12];
        for j in 0..4 {
            q[j] = sc[j] & 63;
            q[j + 4] = m[j] & 63;
        }
        for j in 4..8 {
            q[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            q[j - 4] |= (sc[j] >> 4) << 6;
            q[j] |= (m[j] >> 4) << 6;
        }
        q
    }

    #[test]
    fn k4_scale_packing_round_trips() {
        let sc: [u8; 8] = [1, 63, 17, 32, 45, 63, 0, 50];
        let m: [u8; 8] = [60, 2, 33, 9, 63, 48, 31, 16];
        let q = pack_scales_k4(&sc, &m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_hand_block() {
        let sc: [u8; 8] = std::array::from_fn(|j| (j * 8 + 3) as u8);
        let m: [u8; 8] = std::array::from_fn(|j| (63 - j * 5) as u8);
        let codes: Vec<u8> = (0..256).map(|i| (i * 5 % 16) as u8).collect();
        let (d, dmin) = (0.0625f32, 0.03125f32);
        let mut b = h(d).to_vec();
        b.extend(h(dmin));
        b.extend(pack_scales_k4(&sc, &m));
        let mut qs = [0u8; 128];
        for i in 0..4 {
            for l in 0..32 {
                qs[32 * i + l] = codes[64 * i + l] | (codes[64 * i + 32 + l] << 4);
            }
        }
        b.extend(qs);
        let y = run(GgmlType::Q4K, &b, 256);
        for e in 0..256 {
            let s = e / 32;
            let want = d * sc[s] as f32 * codes[e] as f32 - dmin * m[s] as f32;
            assert!((y[e] - want).abs() <= 1e-6 * want.abs().max(1.0), "element {e}: {} vs {want}", y[e]);
        }
    }

    #[test]
    fn q5_k_hand_block() {
        let sc: [u8; 8] = std::array::from_fn(|j| (50 - j * 3) as u8);
        let m: [u8; 8] = std::array::from_fn(|j| (j * 7 + 2) as u8);
        let codes: Vec<u8> = (0..256).map(|i| (i * 13 % 32) as u8).collect();
        let (d, dmin) = (0.5f32, 0.25f32);
        let mut b = h(d).to_vec();
        b.extend(h(dmin));
        b.extend(pack_scales_k4(&sc, &m));
        let mut qh = [0u8; 32];
        let mut qs = [0u8; 128];
        for e in 0..256 {
            let (s, l) = (e / 32, e % 32);
            qh[l] |= (codes[e] >> 4) << s;
            let byte = 32 * (s / 2) + l;
            qs[byte] |= (codes[e] & 0xF) << (4 * (s % 2));
        }
        b.extend(qh);
        b.extend(qs);
        let y = run(GgmlType::Q5K, &b, 256);
        for e in 0..256 {
            let s = e / 32;
            let want = d * sc[s] as f32 * codes[e] as f32 - dmin * m[s] as f32;
            assert!((y[e] - want).abs() <= 1e-6 * want.abs().max(1.0), "element {e}: {} vs {want}", y[e]);
        }
    }

    #[test]
    fn q6_k_hand_block() {
        // Element e lies in half e / 128; within a half, r = e % 128 is quadrant r / 32 and lane r % 32.
        // Quadrant 0: ql[l] low, qh bits 0-1; 1: ql[l + 32] low, bits 2-3; 2: ql[l] high, bits 4-5;
        // 3: ql[l + 32] high, bits 6-7. Scale index: 8 * half + 2 * quadrant + lane / 16.
        let codes: Vec<u8> = (0..256).map(|i| (i * 29 % 64) as u8).collect();
        let scales: [i8; 16] = std::array::from_fn(|j| (j as i8 - 8) * 9);
        let d = 0.015625f32;
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for e in 0..256 {
            let (half, r) = (e / 128, e % 128);
            let (quad, l) = (r / 32, r % 32);
            let low = codes[e] & 0xF;
            let high = codes[e] >> 4;
            let qli = 64 * half + l + if quad % 2 == 1 { 32 } else { 0 };
            ql[qli] |= low << if quad >= 2 { 4 } else { 0 };
            qh[32 * half + l] |= high << (2 * quad);
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(h(d));
        let y = run(GgmlType::Q6K, &b, 256);
        for e in 0..256 {
            let (half, r) = (e / 128, e % 128);
            let (quad, l) = (r / 32, r % 32);
            let s = scales[8 * half + 2 * quad + l / 16];
            let want = d * s as f32 * (codes[e] as f32 - 32.0);
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn float_types_and_sizes() {
        let y = run(GgmlType::F32, &[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0], 2);
        assert_eq!(y, vec![1.0, -2.0]);
        let mut b = h(1.5).to_vec();
        b.extend(h(-0.25));
        assert_eq!(run(GgmlType::F16, &b, 2), vec![1.5, -0.25]);
        let b: Vec<u8> = [bf16::from_f32(3.0), bf16::from_f32(-7.5)].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(run(GgmlType::BF16, &b, 2), vec![3.0, -7.5]);
        assert_eq!(GgmlType::Q4K.bytes_for(255), None);
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q8_0.bytes_for(usize::MAX - 31), None);
        for id in 0..40 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
    }
}
