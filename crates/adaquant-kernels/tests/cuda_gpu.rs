//! GPU results against the host twins of `cuda::reference` (which `tests/cuda_reference.rs` ties to the CPU
//! kernels): packing and dequantization bit for bit, streaming appends bit for bit, fused and baseline attention to
//! 1e-5 (f32 queries and outputs), 1e-3 (f16) or 5e-3 (bf16, 8 significant bits) relative, at awkward sizes. Outputs are poisoned before each run.
//! Each test prints SKIPPED and passes where there is no CUDA driver, device or NVRTC (fails where
//! `ADAQUANT_REQUIRE_GPU` is set).

#![cfg(feature = "cuda")]

use std::sync::Arc;

use adaquant_kernels::cuda::layout::DType;
use adaquant_kernels::cuda::{quantized_tokens, reference, CudaKernels, DeviceCacheConfig, DeviceF16Kv, DeviceKvCache};
use adaquant_kernels::skip::{skip, Need};
use adaquant_kernels::{Bits, Error, GroupAxis, MetaDtype, QuantSpec};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn device(test: &str) -> Option<Arc<CudaKernels>> {
    match CudaKernels::new(0) {
        Ok(k) => Some(k),
        Err(e) => {
            skip(Need::Gpu, test, &e.to_string());
            None
        }
    }
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// Largest |a - b| over the largest |b| (a norm-relative error that near-zero outputs cannot inflate).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite GPU output (poison left or NaN produced)");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn gpu_quantize_and_dequantize_equal_the_reference_bit_for_bit() {
    let Some(k) = device("gpu_quantize_and_dequantize_equal_the_reference_bit_for_bit") else { return };
    let mut seed = 0;
    for bits in Bits::ALL {
        for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
            for meta in [MetaDtype::F16, MetaDtype::F32] {
                for (heads, tokens, d, g) in
                    [(1, 1usize, 64, 32), (3, 54, 64, 64), (2, 96, 128, 32), (3, 97, 128, 16), (1, 4097, 128, 128)]
                {
                    if axis == GroupAxis::PerChannel && !tokens.is_multiple_of(g) {
                        continue;
                    }
                    seed += 1;
                    let spec = QuantSpec { meta, ..QuantSpec::new(bits, g, axis) };
                    let x = data(heads * tokens * d, seed);
                    let gpu = k.quantize(&x, heads, tokens, d, &spec).unwrap();
                    let what = format!("{bits} {axis} {meta:?} heads={heads} t={tokens} d={d} g={g}");
                    for h in 0..heads {
                        let block = &x[h * tokens * d..(h + 1) * tokens * d];
                        let want = reference::quantize_ref(block, tokens, d, &spec).unwrap();
                        assert_eq!(gpu[h].codes, want.codes, "codes of head {h}: {what}");
                        assert_eq!(gpu[h].scale, want.scale, "scales of head {h}: {what}");
                        assert_eq!(gpu[h].min, want.min, "minima of head {h}: {what}");
                    }
                    let back = k.dequantize(&gpu, tokens, d, &spec).unwrap();
                    for h in 0..heads {
                        let want = reference::dequantize_ref(&gpu[h], tokens, d, &spec);
                        let got = &back[h * tokens * d..(h + 1) * tokens * d];
                        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "dequantize: {what}");
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_quantize_reports_non_finite_input_and_bad_shapes() {
    let Some(k) = device("gpu_quantize_reports_non_finite_input_and_bad_shapes") else { return };
    let spec = QuantSpec::new(Bits::B4, 32, GroupAxis::PerToken);
    let mut x = data(2 * 3 * 64, 9);
    x[200] = f32::INFINITY;
    match k.quantize(&x, 2, 3, 64, &spec) {
        Err(Error::NonFinite { index, .. }) => assert_eq!(index, 200),
        other => panic!("expected NonFinite, got {other:?}"),
    }
    assert!(matches!(k.quantize(&x[1..], 2, 3, 64, &spec), Err(Error::ShapeMismatch { .. })));
    let pc = QuantSpec::new(Bits::B4, 32, GroupAxis::PerChannel);
    assert!(matches!(k.quantize(&data(3 * 64, 1), 1, 3, 64, &pc), Err(Error::GroupDoesNotDivide { .. })));
}

/// Everything a sequence of the device cache holds, rebuilt on the host: per KV head, [tokens][head_dim] keys and
/// values in position order (sinks, dequantized packed tokens, exact tail).
fn host_view(x: &[f32], tokens: usize, h: usize, d: usize, cfg: &DeviceCacheConfig, spec: &QuantSpec) -> Vec<Vec<f32>> {
    let sinks = tokens.min(cfg.sinks);
    let q = quantized_tokens(spec, tokens, cfg.residual, cfg.sinks);
    (0..h)
        .map(|head| {
            let row = |t: usize| &x[(t * h + head) * d..][..d];
            let mut out: Vec<f32> = (0..sinks).flat_map(row).copied().collect();
            if q > 0 {
                let block: Vec<f32> = (sinks..sinks + q).flat_map(row).copied().collect();
                let p = reference::quantize_ref(&block, q, d, spec).unwrap();
                out.extend(reference::dequantize_ref(&p, q, d, spec));
            }
            out.extend((sinks + q..tokens).flat_map(row).copied());
            out
        })
        .collect()
}

struct Case {
    lens: Vec<usize>,
    gqa: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: QuantSpec,
    v: QuantSpec,
    residual: usize,
    sinks: usize,
}

fn run_case(k: &Arc<CudaKernels>, case: &Case, seed: u64) {
    let (h, d) = (case.n_kv_heads, case.head_dim);
    let hq = h * case.gqa;
    let batch = case.lens.len();
    let cfg = DeviceCacheConfig {
        batch,
        n_kv_heads: h,
        head_dim: d,
        capacity: *case.lens.iter().max().unwrap(),
        k: case.k,
        v: case.v,
        residual: case.residual,
        sinks: case.sinks,
    };
    let mut cache = DeviceKvCache::new(k.clone(), cfg).unwrap();
    let mut f16kv = DeviceF16Kv::new(k.clone(), batch, h, d, cfg.capacity).unwrap();
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (b, &t) in case.lens.iter().enumerate() {
        let kx = data(t * h * d, seed * 1000 + 2 * b as u64);
        let vx = data(t * h * d, seed * 1000 + 2 * b as u64 + 1);
        // Append in awkward pieces: 1 token, then 53, then the rest.
        let mut at = 0;
        for piece in [1, 53, usize::MAX] {
            let end = (at + piece).min(t);
            if end > at {
                cache.append(b, &kx[at * h * d..end * h * d], &vx[at * h * d..end * h * d]).unwrap();
            }
            at = end;
        }
        assert_eq!(cache.tokens(b), t);
        f16kv.set_sequence(b, &kx, &vx).unwrap();
        // The packed streams equal the reference quantization of the tokens that left the tail.
        let (qk, qv) = cache.quantized(b);
        for head in 0..h {
            for (side, spec, x, q) in [(0, &case.k, &kx, qk), (1, &case.v, &vx, qv)] {
                let sinks = t.min(case.sinks);
                let block: Vec<f32> =
                    (sinks..sinks + q).flat_map(|tt| &x[(tt * h + head) * d..][..d]).copied().collect();
                let want = reference::quantize_ref(&block, q, d, spec).unwrap();
                let got = cache.packed(b, head, side).unwrap();
                assert_eq!(got, want, "packed side {side} of sequence {b} head {head}");
            }
        }
        keys.push(kx);
        values.push(vx);
    }
    let q = data(batch * hq * d, seed + 77);
    let scale = 1.0 / (d as f32).sqrt();
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        let qr: Vec<f32> =
            adaquant_kernels::cuda::from_dtype_bytes(&adaquant_kernels::cuda::to_dtype_bytes(&q, dtype), dtype);
        let fused = cache.attend(&q, dtype, hq, scale).unwrap();
        let base = f16kv.attend(&q, dtype, hq, scale).unwrap();
        // f32 accumulation is checked to 1e-5; f16 outputs to 1e-3 (half an f16 step is 4.9e-4); bf16 outputs
        // carry only 8 significant bits, so one rounding alone reaches 2e-3.
        let tol = match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 1e-3,
            DType::Bf16 => 5e-3,
        };
        for (b, &t) in case.lens.iter().enumerate() {
            let kv = host_view(&keys[b], t, h, d, &cfg, &case.k);
            let vv = host_view(&values[b], t, h, d, &cfg, &case.v);
            let want = reference::attention_ref(
                &qr[b * hq * d..(b + 1) * hq * d],
                &kv.concat(),
                &vv.concat(),
                hq,
                h,
                d,
                scale,
            );
            let got = &fused[b * hq * d..(b + 1) * hq * d];
            let e = rel_err(got, &want);
            assert!(e <= tol, "fused {dtype:?} sequence {b} (t={t}): relative error {e}");
            let round = |x: &[f32]| x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect::<Vec<f32>>();
            let kf: Vec<f32> = (0..h)
                .flat_map(|head| (0..t).flat_map(move |tt| (0..d).map(move |c| (tt * h + head) * d + c)))
                .map(|i| keys[b][i])
                .collect();
            let vf: Vec<f32> = (0..h)
                .flat_map(|head| (0..t).flat_map(move |tt| (0..d).map(move |c| (tt * h + head) * d + c)))
                .map(|i| values[b][i])
                .collect();
            let want16 =
                reference::attention_ref(&qr[b * hq * d..(b + 1) * hq * d], &round(&kf), &round(&vf), hq, h, d, scale);
            let e = rel_err(&base[b * hq * d..(b + 1) * hq * d], &want16);
            assert!(e <= tol, "f16 baseline {dtype:?} sequence {b} (t={t}): relative error {e}");
        }
    }
}

fn kivi(kb: Bits, vb: Bits, g: usize) -> (QuantSpec, QuantSpec) {
    (QuantSpec::new(kb, g, GroupAxis::PerChannel), QuantSpec::new(vb, g, GroupAxis::PerToken))
}

#[test]
fn gpu_attention_equals_the_reference_at_awkward_sizes() {
    let Some(k) = device("gpu_attention_equals_the_reference_at_awkward_sizes") else { return };
    let (k4, v2) = kivi(Bits::B4, Bits::B2, 32);
    let cases = [
        // Batch 3 of very different lengths, GQA 4, head_dim 128.
        Case { lens: vec![1, 54, 97], gqa: 4, n_kv_heads: 2, head_dim: 128, k: k4, v: v2, residual: 16, sinks: 4 },
        // Batch 17, GQA 8, head_dim 64, 1.58-bit values and 3-bit keys, f32 metadata, no sinks.
        Case {
            lens: (0..17).map(|i| 1 + (i * 263) % 4097).collect(),
            gqa: 8,
            n_kv_heads: 1,
            head_dim: 64,
            k: QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(Bits::B3, 64, GroupAxis::PerChannel) },
            v: QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(Bits::B1_58, 16, GroupAxis::PerToken) },
            residual: 32,
            sinks: 0,
        },
        // GQA 1, per-token keys and per-channel values, 5 and 6 bits.
        Case {
            lens: vec![4097, 97, 54],
            gqa: 1,
            n_kv_heads: 3,
            head_dim: 64,
            k: QuantSpec::new(Bits::B5, 32, GroupAxis::PerToken),
            v: QuantSpec::new(Bits::B6, 16, GroupAxis::PerChannel),
            residual: 20,
            sinks: 2,
        },
        // One long sequence.
        Case { lens: vec![100000], gqa: 4, n_kv_heads: 2, head_dim: 128, k: k4, v: v2, residual: 128, sinks: 4 },
    ];
    for (i, case) in cases.iter().enumerate() {
        run_case(&k, case, i as u64 + 1);
    }
}

#[test]
fn gpu_attention_widths_all_compile_and_run() {
    let Some(k) = device("gpu_attention_widths_all_compile_and_run") else { return };
    for kb in Bits::ALL {
        for vb in Bits::ALL {
            let (ks, vs) = kivi(kb, vb, 32);
            let case =
                Case { lens: vec![97, 1], gqa: 4, n_kv_heads: 2, head_dim: 64, k: ks, v: vs, residual: 8, sinks: 1 };
            run_case(&k, &case, 1000 + (kb as u64) * 10 + vb as u64);
        }
    }
}

#[test]
fn gpu_cache_rejects_what_the_kernels_cannot_do() {
    let Some(k) = device("gpu_cache_rejects_what_the_kernels_cannot_do") else { return };
    let (ks, vs) = kivi(Bits::B4, Bits::B2, 32);
    let cfg =
        DeviceCacheConfig { batch: 1, n_kv_heads: 2, head_dim: 64, capacity: 100, k: ks, v: vs, residual: 8, sinks: 0 };
    let bad_group = DeviceCacheConfig { k: QuantSpec::new(Bits::B4, 128, GroupAxis::PerChannel), ..cfg };
    assert!(matches!(DeviceKvCache::new(k.clone(), bad_group), Err(Error::Cuda(_))));
    let bad_dim = DeviceCacheConfig { head_dim: 96, ..cfg };
    assert!(matches!(DeviceKvCache::new(k.clone(), bad_dim), Err(Error::Cuda(_))));
    let mut cache = DeviceKvCache::new(k.clone(), cfg).unwrap();
    let mut x = data(3 * 2 * 64, 5);
    x[70] = f32::NAN;
    assert!(matches!(cache.append(0, &x, &x), Err(Error::NonFinite { index: 70, .. })));
    assert_eq!(cache.tokens(0), 0);
    assert!(matches!(cache.attend(&data(4 * 64, 1), DType::F32, 4, 0.1), Err(Error::Cuda(_))), "empty sequence");
    cache.append(0, &data(3 * 2 * 64, 6), &data(3 * 2 * 64, 7)).unwrap();
    assert!(matches!(cache.attend(&data(3 * 64, 1), DType::F32, 3, 0.1), Err(Error::BadGqa { .. })));
    assert!(matches!(cache.append(0, &data(98 * 2 * 64, 6), &data(98 * 2 * 64, 7)), Err(Error::ShapeMismatch { .. })));
}
