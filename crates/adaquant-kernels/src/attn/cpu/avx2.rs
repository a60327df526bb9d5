//! AVX2/FMA fused attention kernels.

use half::f16;

use super::{generic, Scratch};
use crate::attn::HeadKv;

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend_head(q: &[f32], head: &HeadKv<'_>, d: usize, scale: f32, out: &mut [f32], s: &mut Scratch) {
    generic::attend_head(q, head, d, scale, out, s)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_f16(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    d: usize,
    scale: f32,
    out: &mut [f32],
    s: &mut Scratch,
) {
    generic::attend_f16(q, k, v, d, scale, out, s)
}
