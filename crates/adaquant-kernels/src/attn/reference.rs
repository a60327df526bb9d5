//! Reference attention: dequantize everything, then plain softmax attention accumulated in f64.

use crate::attn::{check_baseline, explain, first_non_finite_exact, HeadKv};
use crate::error::Result;
use crate::quant::dequantize_ref;

/// Materializes the keys and values of one checked head as `[tokens][head_dim]` f32 (sink, packed, tail).
pub(crate) fn materialize(head: &HeadKv<'_>, d: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let one = |sink: &[f32], packed: &Option<crate::quant::PackedView<'_>>, tail: &[f32]| -> Result<Vec<f32>> {
        let mut x = sink.to_vec();
        if let Some(view) = packed {
            let start = x.len();
            x.resize(start + view.tokens * d, 0.0);
            dequantize_ref(view, &mut x[start..])?;
        }
        x.extend_from_slice(tail);
        Ok(x)
    };
    Ok((one(head.sink_k, &head.k, head.tail_k)?, one(head.sink_v, &head.v, head.tail_v)?))
}

/// Plain decode attention over f32 keys and values (`[tokens][head_dim]` per KV head), accumulated in f64: the
/// reference the fused kernel and the baselines are tested against. Same arguments as
/// [`attention_f32`](crate::attn::attention_f32).
pub fn attention_ref(
    q: &[f32],
    keys: &[&[f32]],
    values: &[&[f32]],
    head_dim: usize,
    softmax_scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n_rep = check_baseline(q, keys, values, head_dim, out)?;
    for (h, (k, v)) in keys.iter().zip(values).enumerate() {
        if let Some(found) = first_non_finite_exact(k, v) {
            return Err(explain(h, Some(found)));
        }
    }
    let d = head_dim;
    for (i, (qi, oi)) in q.chunks(d).zip(out.chunks_mut(d)).enumerate() {
        let (k, v) = (keys[i / n_rep], values[i / n_rep]);
        let scores: Vec<f64> = k
            .chunks(d)
            .map(|kt| qi.iter().zip(kt).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * softmax_scale as f64)
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = scores.iter().map(|&s| (s - max).exp()).collect();
        let sum: f64 = p.iter().sum();
        let mut acc = vec![0f64; d];
        for (pt, vt) in p.iter().zip(v.chunks(d)) {
            for (a, &x) in acc.iter_mut().zip(vt) {
                *a += pt * x as f64;
            }
        }
        for (o, a) in oi.iter_mut().zip(&acc) {
            *o = (a / sum) as f32;
        }
    }
    Ok(())
}
