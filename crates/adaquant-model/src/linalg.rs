//! Dense f32 helpers of the forward pass: `x · Wᵀ` (the batch-invariant kernel of [`crate::gemm`], faer's GEMM as
//! the speed baseline, and a plain f64 twin), RMSNorm and SiLU.
//!
//! faer 0.24's matrix multiply can leave the upper halves of the AVX registers dirty, after which glibc's `expf`
//! and `sincosf` run 20-60x slower (SSE/AVX transition penalties). The workspace builds with
//! `-C target-cpu=x86-64-v3` (see `.cargo/config.toml`), so the compiler emits VEX-encoded code throughout and
//! inserts `vzeroupper` itself; the `exp_after_matmul_is_not_slowed` check in `examples/speed.rs` measures it.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

pub use crate::gemm::{matmul_t, matmul_t_lanes_ref};

/// Row counts at or above this use rayon inside faer; below it the threads cost more than they save.
const PAR_MIN_ROWS: usize = 4;

/// `out[n][m] = x[n][k] · w[m][k]ᵀ` through faer's GEMM. Not batch-invariant (a single row and a panel of rows take
/// different kernels); kept as the speed baseline that `benches/forward.rs` compares [`matmul_t`] with.
pub fn matmul_t_faer(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, out: &mut [f32]) {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), m * k);
    debug_assert_eq!(out.len(), n * m);
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let par = if n >= PAR_MIN_ROWS || m * k >= 1 << 20 { Par::rayon(0) } else { Par::Seq };
    let dst = MatMut::from_row_major_slice_mut(out, n, m);
    let lhs = MatRef::from_row_major_slice(x, n, k);
    let rhs = MatRef::from_row_major_slice(w, m, k).transpose();
    matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par);
}

/// The plain-loop twin of [`matmul_t`] (f64 accumulation), for tests.
pub fn matmul_t_ref(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, out: &mut [f32]) {
    for i in 0..n {
        for j in 0..m {
            let mut s = 0.0f64;
            for c in 0..k {
                s += x[i * k + c] as f64 * w[j * k + c] as f64;
            }
            out[i * m + j] = s as f32;
        }
    }
}

/// RMSNorm of each `dim`-long row of `x` into `out`: `x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).with_min_len(16).for_each(|(o, r)| {
        let ss: f32 = r.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(r).zip(weight) {
            *o = v * inv * w;
        }
    });
}

/// `gate[i] = silu(gate[i]) * up[i]`, SwiGLU's gating.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(g, u)| {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    });
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]`, Gemma's GeGLU gating with the tanh approximation of GELU:
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh_glu(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(g, u)| {
        for (g, &u) in g.iter_mut().zip(u) {
            let x = *g;
            *g = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh()) * u;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matmul_matches_reference_on_awkward_sizes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for &(n, k, m) in &[(1, 1, 1), (1, 576, 192), (3, 17, 5), (7, 64, 33), (37, 129, 71), (130, 96, 257)] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut slow = vec![0.0; n * m];
            matmul_t_ref(&x, n, k, &w, m, &mut slow);
            type Product = fn(&[f32], usize, usize, &[f32], usize, &mut [f32]);
            for (name, f) in [("batch-invariant", matmul_t as Product), ("faer", matmul_t_faer)] {
                let mut fast = vec![f32::NAN; n * m];
                f(&x, n, k, &w, m, &mut fast);
                for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (k as f32).sqrt(), "{name} {n}x{k}x{m} element {i}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn rms_norm_and_swiglu() {
        let x = [3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0];
        let mut out = [0.0; 6];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let r0 = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r0).abs() < 1e-6 && (out[1] - 8.0 / r0).abs() < 1e-6);
        // A zero row stays zero when eps > 0 would keep it finite; with eps = 0 it is 0/0, so check row 2.
        assert!((out[4] - 1.0).abs() < 1e-6 && (out[5] - 2.0).abs() < 1e-6);
        let mut g = [0.0f32, 2.0, -3.0];
        swiglu(&mut g, &[5.0, 1.0, 2.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        assert!((g[2] - 2.0 * -3.0 / (1.0 + 3.0f32.exp())).abs() < 1e-6);
    }

    #[test]
    fn gelu_tanh_matches_the_formula_in_f64() {
        let xs = [-6.0f32, -2.5, -1.0, -0.1, 0.0, 0.3, 1.0, 2.0, 7.5];
        let mut g = xs;
        gelu_tanh_glu(&mut g, &[2.0; 9]);
        for (&x, &got) in xs.iter().zip(&g) {
            let x = x as f64;
            let want =
                0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()) * 2.0;
            assert!((got as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "gelu_tanh({x}) = {got}, want {want}");
        }
    }
}
