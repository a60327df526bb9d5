//! Measured group ranges of the keys and values a model appends: the `outlier` sensitivity of the budget solver.
//!
//! [`RangeRecorder`] wraps any cache, passes every call through unchanged, and adds, per layer and side, `G * R^2 / 12`
//! for every whole group of what was appended (`R` = max - min of the group, in the point's layout). For min-max
//! codes at `b` bits a group's squared error is about `G * (R / 2^b)^2 / 12`, so `s = sqrt(sum)` is the solver's
//! `s` in `s^2 * 2^(-2b)`: an outlier, which widens its group's range, raises its layer's sensitivity.

use adaquant_cache::{CacheShape, KvCache, MemoryReport, Result};
use adaquant_kernels::GroupAxis;

/// A cache wrapper that records group ranges of appended keys and values (see the module docs).
pub struct RangeRecorder {
    inner: Box<dyn KvCache>,
    group: usize,
    k_axis: GroupAxis,
    v_axis: GroupAxis,
    /// Per layer: sums of `G * R^2 / 12` over keys' and values' groups.
    k: Vec<f64>,
    v: Vec<f64>,
}

impl RangeRecorder {
    /// Records groups of `group` elements (channels of one token, or tokens of one channel, by axis).
    pub fn new(inner: Box<dyn KvCache>, group: usize, k_axis: GroupAxis, v_axis: GroupAxis) -> RangeRecorder {
        let n = inner.shape().n_layers;
        RangeRecorder { inner, group: group.max(1), k_axis, v_axis, k: vec![0.0; n], v: vec![0.0; n] }
    }

    /// Per layer, `sqrt(sum of G * R^2 / 12)` for keys and for values.
    pub fn sensitivities(&self) -> (Vec<f64>, Vec<f64>) {
        (self.k.iter().map(|x| x.sqrt()).collect(), self.v.iter().map(|x| x.sqrt()).collect())
    }
}

/// `sum over whole groups of G * R^2 / 12` for `x` (`[n][heads][head_dim]`). Per-token groups are `g` consecutive
/// channels of one token and head; per-channel groups are `g` consecutive tokens of one channel and head (a
/// partial last group of tokens is left out).
pub fn group_range_energy(x: &[f32], heads: usize, head_dim: usize, g: usize, axis: GroupAxis) -> f64 {
    let row = heads * head_dim;
    if row == 0 || g == 0 {
        return 0.0;
    }
    let n = x.len() / row;
    let range = |it: &mut dyn Iterator<Item = f32>| -> f64 {
        let (mn, mx) = it.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        mx as f64 - mn as f64
    };
    let mut sum = 0.0;
    match axis {
        GroupAxis::PerToken => {
            for grp in x[..n * row].chunks_exact(g) {
                let r = range(&mut grp.iter().copied());
                sum += g as f64 * r * r / 12.0;
            }
        }
        GroupAxis::PerChannel => {
            for t0 in (0..n / g * g).step_by(g) {
                for c in 0..row {
                    let r = range(&mut (t0..t0 + g).map(|t| x[t * row + c]));
                    sum += g as f64 * r * r / 12.0;
                }
            }
        }
    }
    sum
}

impl KvCache for RangeRecorder {
    fn shape(&self) -> &CacheShape {
        self.inner.shape()
    }

    fn seq_len(&self, layer: usize) -> usize {
        self.inner.seq_len(layer)
    }

    fn append_attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> Result<()> {
        self.inner.append_attend(layer, q, k, v, out)?;
        let s = self.inner.shape();
        let (h, d) = (s.n_kv_heads, s.head_dim);
        self.k[layer] += group_range_energy(k, h, d, self.group, self.k_axis);
        self.v[layer] += group_range_energy(v, h, d, self.group, self.v_axis);
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }

    fn clear(&mut self) {
        self.inner.clear();
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaquant_cache::FullPrecisionCache;
    use rand::{Rng, SeedableRng};

    /// The closed form against a slow twin that builds each group explicitly from `(token, head, channel)`.
    #[test]
    fn group_energy_equals_the_explicit_groups() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (heads, d) = (3, 8);
        for (n, g) in [(1, 4), (7, 8), (13, 4), (16, 2)] {
            let x: Vec<f32> = (0..n * heads * d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let at = |t: usize, h: usize, c: usize| x[(t * heads + h) * d + c] as f64;
            let groups = |axis: GroupAxis| -> Vec<Vec<f64>> {
                let mut out = Vec::new();
                for h in 0..heads {
                    match axis {
                        GroupAxis::PerToken => {
                            for t in 0..n {
                                for c0 in (0..d).step_by(g) {
                                    out.push((c0..c0 + g).map(|c| at(t, h, c)).collect());
                                }
                            }
                        }
                        GroupAxis::PerChannel => {
                            for t0 in (0..n / g * g).step_by(g) {
                                for c in 0..d {
                                    out.push((t0..t0 + g).map(|t| at(t, h, c)).collect());
                                }
                            }
                        }
                    }
                }
                out
            };
            for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
                let want: f64 = groups(axis)
                    .iter()
                    .map(|grp| {
                        let r =
                            grp.iter().cloned().fold(f64::MIN, f64::max) - grp.iter().cloned().fold(f64::MAX, f64::min);
                        g as f64 * r * r / 12.0
                    })
                    .sum();
                let got = group_range_energy(&x, heads, d, g, axis);
                assert!((got - want).abs() <= 1e-9 * want.max(1.0), "n {n} g {g} {axis:?}: {got} vs {want}");
            }
        }
    }

    /// The recorder passes every call through unchanged and raises the sensitivity of the layer with an outlier.
    #[test]
    fn recorder_is_transparent_and_sees_an_outlier() {
        let shape = CacheShape::new(2, 4, 2, 16, 64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let n = 10;
        let mut rows = |w: usize| -> Vec<f32> { (0..n * w).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (q, k, v) = (rows(shape.q_row()), rows(shape.kv_row()), rows(shape.kv_row()));
        let mut plain = FullPrecisionCache::new(shape.clone()).unwrap();
        let mut rec = RangeRecorder::new(
            Box::new(FullPrecisionCache::new(shape.clone()).unwrap()),
            8,
            GroupAxis::PerToken,
            GroupAxis::PerToken,
        );
        let mut k1 = k.clone();
        k1[5] = 40.0;
        for (layer, kk) in [(0, &k), (1, &k1)] {
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            plain.append_attend(layer, &q, kk, &v, &mut a).unwrap();
            rec.append_attend(layer, &q, kk, &v, &mut b).unwrap();
            assert_eq!(a, b);
        }
        assert_eq!(rec.memory(), plain.memory());
        let (ks, vs) = rec.sensitivities();
        assert!(ks[1] > 3.0 * ks[0], "an outlier of 40 should dominate: {ks:?}");
        assert!((vs[0] - vs[1]).abs() < 1e-12, "the same values give the same sensitivity: {vs:?}");
    }
}
