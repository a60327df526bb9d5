//! Matrix statistics: Frobenius and spectral norms, singular-value spectra, spectral gap, effective rank and
//! per-channel magnitudes.
//!
//! Matrices are read through [`View`], a row-major window over a slice with a row stride, so one KV head of a
//! token-major cache (`[tokens][kv_heads][head_dim]`) is analysed in place. All arithmetic is in f64.
//! Singular values come from faer ([`singular_values`]); [`singular_values_ref`] is an independent one-sided
//! Jacobi reference, slow but accurate to high relative precision, that the tests compare against.

use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::error::{AnalysisError, Result};

/// A row-major matrix window: element `(r, c)` is `data[r * stride + c]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a, T: Copy + Into<f64>> View<'a, T> {
    /// A dense row-major matrix (stride = cols).
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> View<'a, T> {
        View { data, rows, cols, stride: cols }
    }

    /// Columns `col0..col0 + cols` of a row-major matrix whose rows are `stride` long.
    pub fn columns(data: &'a [T], rows: usize, stride: usize, col0: usize, cols: usize) -> View<'a, T> {
        View { data: data.get(col0..).unwrap_or(&[]), rows, cols, stride }
    }

    /// Rows `row0..row0 + rows` of this view.
    pub fn row_range(&self, row0: usize, rows: usize) -> View<'a, T> {
        View { data: self.data.get(row0 * self.stride..).unwrap_or(&[]), rows, cols: self.cols, stride: self.stride }
    }

    /// Checks that the view fits its slice, is not empty and holds only finite values.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Err(AnalysisError::EmptyMatrix { what: what.into(), rows: self.rows, cols: self.cols });
        }
        let needed = (self.rows - 1) * self.stride + self.cols;
        if self.stride < self.cols || self.data.len() < needed {
            return Err(AnalysisError::Shape {
                what: what.into(),
                rows: self.rows,
                cols: self.cols,
                stride: self.stride,
                needed,
                got: self.data.len(),
            });
        }
        for r in 0..self.rows {
            if let Some(c) = self.row(r).iter().position(|&x| !x.into().is_finite()) {
                return Err(AnalysisError::NonFinite { what: what.into(), row: r, col: c });
            }
        }
        Ok(())
    }

    fn row(&self, r: usize) -> &'a [T] {
        &self.data[r * self.stride..r * self.stride + self.cols]
    }

    /// Element `(r, c)` as f64.
    pub fn get(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.stride + c].into()
    }

    /// A dense f64 copy as a faer matrix.
    pub fn to_faer(&self) -> Mat<f64> {
        Mat::from_fn(self.rows, self.cols, |r, c| self.get(r, c))
    }
}

/// Frobenius norm sqrt(sum x^2), accumulated in f64 with scaling against overflow.
pub fn frobenius<T: Copy + Into<f64>>(m: View<'_, T>) -> f64 {
    let mut scale = 0.0f64;
    let mut ssq = 1.0f64;
    for r in 0..m.rows {
        for &x in m.row(r) {
            let a = x.into().abs();
            if a > 0.0 {
                if scale < a {
                    ssq = 1.0 + ssq * (scale / a) * (scale / a);
                    scale = a;
                } else {
                    ssq += (a / scale) * (a / scale);
                }
            }
        }
    }
    scale * ssq.sqrt()
}

/// All singular values, largest first, through faer.
pub fn singular_values<T: Copy + Into<f64>>(m: View<'_, T>, what: &str) -> Result<Vec<f64>> {
    m.check(what)?;
    let a = m.to_faer();
    a.singular_values().map_err(|_| AnalysisError::SvdNoConvergence { what: what.into() })
}

/// Reference twin of [`singular_values`]: one-sided Jacobi (Hestenes) rotations on the columns of the matrix (or
/// of its transpose when it is wide) until all columns are orthogonal; the singular values are the column norms.
pub fn singular_values_ref<T: Copy + Into<f64>>(m: View<'_, T>, what: &str) -> Result<Vec<f64>> {
    m.check(what)?;
    // Work on a tall matrix stored column by column.
    let (rows, cols) = if m.rows >= m.cols { (m.rows, m.cols) } else { (m.cols, m.rows) };
    let mut a: Vec<Vec<f64>> = (0..cols)
        .map(|j| (0..rows).map(|i| if m.rows >= m.cols { m.get(i, j) } else { m.get(j, i) }).collect())
        .collect();
    let eps = f64::EPSILON;
    for _sweep in 0..80 {
        let mut rotated = false;
        for p in 0..cols {
            for q in p + 1..cols {
                let (alpha, beta, gamma) = a[p]
                    .iter()
                    .zip(&a[q])
                    .fold((0.0, 0.0, 0.0), |(al, be, ga), (&x, &y)| (al + x * x, be + y * y, ga + x * y));
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                let (left, right) = a.split_at_mut(q);
                for (x, y) in left[p].iter_mut().zip(right[0].iter_mut()) {
                    let (xp, yq) = (*x, *y);
                    *x = c * xp - s * yq;
                    *y = s * xp + c * yq;
                }
            }
        }
        if !rotated {
            let mut s: Vec<f64> = a.iter().map(|col| col.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
            s.sort_by(|x, y| y.total_cmp(x));
            return Ok(s);
        }
    }
    Err(AnalysisError::SvdNoConvergence { what: what.into() })
}

/// sigma1 / sigma2, or `None` when there is no second non-zero singular value.
pub fn spectral_gap(s: &[f64]) -> Option<f64> {
    match s {
        [a, b, ..] if *b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Effective rank (Roy and Vetterli, 2007): exp of the Shannon entropy of the singular values normalised to sum 1,
/// `exp(-sum p_i ln p_i)` with `p_i = sigma_i / sum sigma`. It is 1 for a rank-one matrix, n for n equal singular
/// values, and 0 for the zero matrix.
pub fn effective_rank(s: &[f64]) -> f64 {
    let total: f64 = s.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = s.iter().filter(|&&x| x > 0.0).map(|&x| x / total).map(|p| -p * p.ln()).sum();
    h.exp()
}

/// Stable rank ||A||_F^2 / ||A||_2^2, a smooth lower bound of the rank.
pub fn stable_rank(fro: f64, spec: f64) -> f64 {
    if spec > 0.0 {
        (fro / spec).powi(2)
    } else {
        0.0
    }
}

/// Norms and spectrum of one matrix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatStats {
    pub rows: usize,
    pub cols: usize,
    /// Frobenius norm.
    pub fro: f64,
    /// Spectral norm (largest singular value).
    pub spec: f64,
    /// All singular values, largest first.
    pub singular_values: Vec<f64>,
    /// sigma1 / sigma2 (`null` when sigma2 is zero).
    pub spectral_gap: Option<f64>,
    /// Effective rank, see [`effective_rank`].
    pub effective_rank: f64,
    /// ||A||_F^2 / ||A||_2^2.
    pub stable_rank: f64,
}

/// Frobenius norm, spectrum and the numbers derived from it.
pub fn mat_stats<T: Copy + Into<f64>>(m: View<'_, T>, what: &str) -> Result<MatStats> {
    let s = singular_values(m, what)?;
    let fro = frobenius(m);
    let spec = s.first().copied().unwrap_or(0.0);
    Ok(MatStats {
        rows: m.rows,
        cols: m.cols,
        fro,
        spec,
        spectral_gap: spectral_gap(&s),
        effective_rank: effective_rank(&s),
        stable_rank: stable_rank(fro, spec),
        singular_values: s,
    })
}

/// Per-column (channel) magnitudes over all rows (tokens).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// max |x| per channel.
    pub max_abs: Vec<f64>,
    /// mean |x| per channel.
    pub mean_abs: Vec<f64>,
}

/// Per-channel max and mean of |x|, walking the matrix row by row (cache-friendly for token-major data).
pub fn channel_stats<T: Copy + Into<f64>>(m: View<'_, T>) -> ChannelStats {
    let mut max_abs = vec![0.0f64; m.cols];
    let mut sum = vec![0.0f64; m.cols];
    for r in 0..m.rows {
        for ((mx, sm), &x) in max_abs.iter_mut().zip(sum.iter_mut()).zip(m.row(r)) {
            let a = x.into().abs();
            *mx = mx.max(a);
            *sm += a;
        }
    }
    let n = m.rows.max(1) as f64;
    ChannelStats { max_abs, mean_abs: sum.into_iter().map(|s| s / n).collect() }
}

/// Reference twin of [`channel_stats`]: one column at a time.
pub fn channel_stats_ref<T: Copy + Into<f64>>(m: View<'_, T>) -> ChannelStats {
    let col = |c: usize| (0..m.rows).map(move |r| m.get(r, c).abs());
    ChannelStats {
        max_abs: (0..m.cols).map(|c| col(c).fold(0.0, f64::max)).collect(),
        mean_abs: (0..m.cols).map(|c| col(c).sum::<f64>() / m.rows.max(1) as f64).collect(),
    }
}

/// Element-wise mean, min and max of several equally long vectors (for example spectra of the heads of a layer).
/// Shorter vectors are allowed; each position uses the vectors that reach it.
pub fn mean_min_max(vs: &[&[f64]]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = vs.iter().map(|v| v.len()).max().unwrap_or(0);
    let mut mean = Vec::with_capacity(n);
    let mut lo = Vec::with_capacity(n);
    let mut hi = Vec::with_capacity(n);
    for i in 0..n {
        let xs: Vec<f64> = vs.iter().filter_map(|v| v.get(i).copied()).collect();
        mean.push(xs.iter().sum::<f64>() / xs.len() as f64);
        lo.push(xs.iter().copied().fold(f64::INFINITY, f64::min));
        hi.push(xs.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    }
    (mean, lo, hi)
}
