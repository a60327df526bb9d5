//! Seeded random Hadamard rotations of one KV head: `x -> H D x`, with `D` a random +-1 diagonal and `H` the
//! normalised Walsh-Hadamard matrix.
//!
//! Rotating keys and queries by the same orthogonal matrix leaves every score `q . k` unchanged in exact arithmetic,
//! and rotating values before they are stored and the attention output back afterwards leaves the output unchanged;
//! in between, the rotated coordinates are spread evenly (an outlier channel is smeared over all of them) and close
//! to Gaussian, which is what low-bit quantizers and Lloyd-Max codebooks want.
//!
//! A power-of-two `head_dim` gets one Hadamard block; any other even size gets block-diagonal Hadamard blocks of the
//! largest power of two dividing it (96 = 3 blocks of 32); an odd size is [`Error::RotationSize`].
//! The fast transform ([`HadamardRotation::rotate`]) costs `O(d log d)` per row; its reference twin
//! ([`HadamardRotation::rotate_ref`]) multiplies by the dense matrix in f64.

use crate::error::{Error, Result};

/// Size of the Hadamard blocks for `head_dim`: the largest power of two dividing it, at least 2.
pub fn block_size(head_dim: usize) -> Result<usize> {
    let b = if head_dim == 0 { 0 } else { 1usize << head_dim.trailing_zeros() };
    if b < 2 {
        return Err(Error::RotationSize { head_dim, seed: 0 });
    }
    Ok(b)
}

/// The seed of one KV head's sign pattern, from the base seed of a spec, the layer, the side (0 keys, 1 values)
/// and the KV head.
pub fn head_seed(base: u64, layer: usize, side: usize, head: usize) -> u64 {
    let mut s = base ^ 0x6a09_e667_f3bc_c909;
    for x in [layer as u64, side as u64, head as u64] {
        s = splitmix64(s.wrapping_add(x.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    }
    s
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One head's rotation `R = H D` (block-diagonal `H` for head sizes that are not powers of two).
#[derive(Clone, Debug, PartialEq)]
pub struct HadamardRotation {
    signs: Vec<f32>,
    block: usize,
    norm: f32,
}

impl HadamardRotation {
    /// The rotation of a `head_dim`-sized head with the sign pattern of `seed`.
    pub fn new(head_dim: usize, seed: u64) -> Result<HadamardRotation> {
        let block = block_size(head_dim).map_err(|_| Error::RotationSize { head_dim, seed })?;
        let mut state = seed;
        let mut bits = 0u64;
        let signs = (0..head_dim)
            .map(|i| {
                if i % 64 == 0 {
                    state = splitmix64(state);
                    bits = state;
                }
                if (bits >> (i % 64)) & 1 == 1 {
                    -1.0
                } else {
                    1.0
                }
            })
            .collect();
        Ok(HadamardRotation { signs, block, norm: 1.0 / (block as f32).sqrt() })
    }

    /// Channels per row.
    pub fn head_dim(&self) -> usize {
        self.signs.len()
    }

    /// Size of each Hadamard block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The +-1 diagonal.
    pub fn signs(&self) -> &[f32] {
        &self.signs
    }

    /// Rotates every row of `x` (`[rows][head_dim]`) in place: `x <- H D x`.
    pub fn rotate(&self, x: &mut [f32]) {
        let d = self.head_dim();
        debug_assert!(x.len().is_multiple_of(d));
        for row in x.chunks_exact_mut(d) {
            for (v, s) in row.iter_mut().zip(&self.signs) {
                *v *= s;
            }
            self.hadamard(row);
        }
    }

    /// Undoes [`Self::rotate`] on every row of `x` in place: `x <- D H x` (`H` is symmetric and orthogonal).
    pub fn unrotate(&self, x: &mut [f32]) {
        let d = self.head_dim();
        debug_assert!(x.len().is_multiple_of(d));
        for row in x.chunks_exact_mut(d) {
            self.hadamard(row);
            for (v, s) in row.iter_mut().zip(&self.signs) {
                *v *= s;
            }
        }
    }

    /// Normalised fast Walsh-Hadamard transform of each block of one row.
    #[inline]
    fn hadamard(&self, row: &mut [f32]) {
        let b = self.block;
        for blk in row.chunks_exact_mut(b) {
            let mut h = 1;
            while h < b {
                for i in (0..b).step_by(2 * h) {
                    let (lo, hi) = blk[i..i + 2 * h].split_at_mut(h);
                    for (a, c) in lo.iter_mut().zip(hi.iter_mut()) {
                        let (x, y) = (*a, *c);
                        *a = x + y;
                        *c = x - y;
                    }
                }
                h *= 2;
            }
            for v in blk.iter_mut() {
                *v *= self.norm;
            }
        }
    }

    /// The dense matrix `R` (`[head_dim][head_dim]`, row-major, f64): `(R x)_i = sum_j R_ij x_j`.
    pub fn matrix(&self) -> Vec<f64> {
        let d = self.head_dim();
        let b = self.block;
        let norm = 1.0 / (b as f64).sqrt();
        let mut m = vec![0f64; d * d];
        for i in 0..d {
            for j in (i / b) * b..(i / b + 1) * b {
                let sign = if ((i % b) & (j % b)).count_ones().is_multiple_of(2) { 1.0 } else { -1.0 };
                m[i * d + j] = sign * norm * self.signs[j] as f64;
            }
        }
        m
    }

    /// Reference twin of [`Self::rotate`]: every row times the dense matrix, in f64.
    pub fn rotate_ref(&self, x: &[f32]) -> Vec<f32> {
        let d = self.head_dim();
        let m = self.matrix();
        x.chunks_exact(d)
            .flat_map(|row| {
                (0..d).map(|i| (0..d).map(|j| m[i * d + j] * row[j] as f64).sum::<f64>() as f32).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Reference twin of [`Self::unrotate`]: every row times the transposed dense matrix, in f64.
    pub fn unrotate_ref(&self, x: &[f32]) -> Vec<f32> {
        let d = self.head_dim();
        let m = self.matrix();
        x.chunks_exact(d)
            .flat_map(|row| {
                (0..d).map(|j| (0..d).map(|i| m[i * d + j] * row[i] as f64).sum::<f64>() as f32).collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes() {
        assert_eq!(block_size(64).unwrap(), 64);
        assert_eq!(block_size(96).unwrap(), 32);
        assert_eq!(block_size(80).unwrap(), 16);
        assert_eq!(block_size(6).unwrap(), 2);
        assert!(matches!(block_size(63), Err(Error::RotationSize { head_dim: 63, .. })));
        assert!(block_size(0).is_err());
        assert!(HadamardRotation::new(45, 3).is_err());
    }

    #[test]
    fn seeds_give_distinct_patterns() {
        let a = HadamardRotation::new(64, head_seed(0, 0, 0, 0)).unwrap();
        let b = HadamardRotation::new(64, head_seed(0, 0, 0, 1)).unwrap();
        let c = HadamardRotation::new(64, head_seed(0, 1, 0, 0)).unwrap();
        assert_ne!(a.signs(), b.signs());
        assert_ne!(a.signs(), c.signs());
        assert_eq!(a, HadamardRotation::new(64, head_seed(0, 0, 0, 0)).unwrap());
        let minus = a.signs().iter().filter(|&&s| s < 0.0).count();
        assert!((16..=48).contains(&minus), "{minus} of 64 signs are negative");
    }
}
