//! Fused decode attention against dequantize-then-reference attention, at every SIMD level, plus the baselines.

mod common;

use std::sync::Mutex;

use adaquant_kernels::attn::{
    attention_f16, attention_f32, attention_ref, key_kernel_for, set_attn_kernel, AttnKernel, HeadKv,
};
use adaquant_kernels::pack::unpack_ref;
use adaquant_kernels::quant::{dequantize_ref, quantize, PackedStream};
use adaquant_kernels::simd::{detected, set_simd_override, SimdLevel};
use adaquant_kernels::{decode_attention, decode_attention_ref, decode_attention_serial};
use adaquant_kernels::{Bits, Error, GroupAxis, QuantSpec};
use half::f16;
use rand::rngs::StdRng;

/// Tests that change the process-wide SIMD override hold this lock; the others hold it too so they always run at
/// the detected level. Holding it also pins the exact key-score kernel, whose error against the reference these
/// tests bound at 1e-5; `int_dot_keys_stay_within_their_bound` switches to the integer-dot kernel under the lock.
static SIMD: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    let guard = SIMD.lock().unwrap_or_else(|e| e.into_inner());
    set_attn_kernel(Some(AttnKernel::Exact));
    guard
}

/// One KV head as a cache holds it: sinks, packed parts (K and V split differently), full-precision tails.
struct Head {
    sink_k: Vec<f32>,
    sink_v: Vec<f32>,
    k: Option<PackedStream>,
    v: Option<PackedStream>,
    tail_k: Vec<f32>,
    tail_v: Vec<f32>,
}

impl Head {
    /// `ctx` history tokens go to the packed parts (per-channel streams take whole blocks, the rest stays exact),
    /// followed by `tail` exact tokens; `sink` exact tokens come first.
    fn new(rng: &mut StdRng, ks: QuantSpec, vs: QuantSpec, d: usize, sink: usize, ctx: usize, tail: usize) -> Head {
        let k = common::keys_with_outliers(rng, sink + ctx + tail, d);
        let v = common::gaussian(rng, (sink + ctx + tail) * d, 1.0);
        let split = |spec: &QuantSpec, x: &[f32]| -> (Option<PackedStream>, Vec<f32>) {
            let packed = if spec.axis == GroupAxis::PerChannel { ctx / spec.group * spec.group } else { ctx };
            let stream = (packed > 0).then(|| quantize(spec, d, &x[sink * d..(sink + packed) * d]).unwrap());
            (stream, x[(sink + packed) * d..].to_vec())
        };
        let (kp, tail_k) = split(&ks, &k);
        let (vp, tail_v) = split(&vs, &v);
        Head { sink_k: k[..sink * d].to_vec(), sink_v: v[..sink * d].to_vec(), k: kp, v: vp, tail_k, tail_v }
    }

    fn kv(&self) -> HeadKv<'_> {
        HeadKv {
            sink_k: &self.sink_k,
            sink_v: &self.sink_v,
            k: self.k.as_ref().map(|s| s.view()),
            v: self.v.as_ref().map(|s| s.view()),
            tail_k: &self.tail_k,
            tail_v: &self.tail_v,
        }
    }

    /// Keys and values dequantized with the reference path, concatenated in position order.
    fn dequantized(&self, d: usize) -> (Vec<f32>, Vec<f32>) {
        let one = |sink: &[f32], s: &Option<PackedStream>, tail: &[f32]| {
            let mut x = sink.to_vec();
            if let Some(s) = s {
                let start = x.len();
                x.resize(start + s.tokens() * d, 0.0);
                dequantize_ref(&s.view(), &mut x[start..]).unwrap();
            }
            x.extend_from_slice(tail);
            x
        };
        (one(&self.sink_k, &self.k, &self.tail_k), one(&self.sink_v, &self.v, &self.tail_v))
    }
}

/// Worst norm-wise relative error over query heads.
fn worst_rel_err(a: &[f32], b: &[f32], d: usize) -> f64 {
    a.chunks(d).zip(b.chunks(d)).map(|(x, y)| common::rel_err(x, y)).fold(0.0, f64::max)
}

struct Case {
    kspec: QuantSpec,
    vspec: QuantSpec,
    d: usize,
    n_kv: usize,
    gqa: usize,
    sink: usize,
    ctx: usize,
    tail: usize,
}

/// Checks the fused kernel (rayon and serial) and `decode_attention_ref` against reference attention over the
/// dequantized history, at the current SIMD level.
fn check(rng: &mut StdRng, c: &Case) {
    let heads: Vec<Head> = (0..c.n_kv).map(|_| Head::new(rng, c.kspec, c.vspec, c.d, c.sink, c.ctx, c.tail)).collect();
    let kv: Vec<HeadKv<'_>> = heads.iter().map(Head::kv).collect();
    let n_q = c.n_kv * c.gqa;
    let q = common::gaussian(rng, n_q * c.d, 1.0);
    let scale = 1.0 / (c.d as f32).sqrt();
    let deq: Vec<(Vec<f32>, Vec<f32>)> = heads.iter().map(|h| h.dequantized(c.d)).collect();
    let ks: Vec<&[f32]> = deq.iter().map(|x| x.0.as_slice()).collect();
    let vs: Vec<&[f32]> = deq.iter().map(|x| x.1.as_slice()).collect();
    let mut want = vec![0f32; n_q * c.d];
    attention_ref(&q, &ks, &vs, c.d, scale, &mut want).unwrap();
    let label = format!(
        "K{} {} V{} {} d={} n_kv={} gqa={} sink={} ctx={} tail={}",
        c.kspec.bits, c.kspec.axis, c.vspec.bits, c.vspec.axis, c.d, c.n_kv, c.gqa, c.sink, c.ctx, c.tail
    );
    let mut got = vec![0f32; n_q * c.d];
    decode_attention(&q, &kv, c.d, scale, &mut got).unwrap();
    let e = worst_rel_err(&got, &want, c.d);
    assert!(e < 1e-5, "fused: rel err {e:e} at {label}");
    let mut serial = vec![0f32; n_q * c.d];
    decode_attention_serial(&q, &kv, c.d, scale, &mut serial).unwrap();
    assert_eq!(serial, got, "serial differs from rayon at {label}");
    let mut r = vec![0f32; n_q * c.d];
    decode_attention_ref(&q, &kv, c.d, scale, &mut r).unwrap();
    assert!(worst_rel_err(&r, &want, c.d) < 1e-6, "decode_attention_ref at {label}");
}

fn levels() -> Vec<SimdLevel> {
    [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= detected()).collect()
}

const AXES: [(GroupAxis, GroupAxis); 4] = [
    (GroupAxis::PerChannel, GroupAxis::PerToken),
    (GroupAxis::PerToken, GroupAxis::PerToken),
    (GroupAxis::PerChannel, GroupAxis::PerChannel),
    (GroupAxis::PerToken, GroupAxis::PerChannel),
];

#[test]
fn every_bit_pair_and_layout_at_every_simd_level() {
    let _lock = lock();
    let mut rng = common::rng(20);
    for level in levels() {
        set_simd_override(Some(level));
        for (i, kb) in Bits::ALL.into_iter().enumerate() {
            for (j, vb) in Bits::ALL.into_iter().enumerate() {
                for (a, (ka, va)) in AXES.into_iter().enumerate() {
                    let case = Case {
                        kspec: QuantSpec::new(kb, 32, ka),
                        vspec: QuantSpec::new(vb, if va == GroupAxis::PerToken { 64 } else { 16 }, va),
                        d: 64,
                        n_kv: 2,
                        gqa: 3,
                        sink: (i + a) % 2 * 4,
                        ctx: 97,
                        tail: if (i + j + a) % 2 == 0 { 0 } else { 37 },
                    };
                    check(&mut rng, &case);
                }
            }
        }
    }
    set_simd_override(None);
}

/// The integer-dot key kernels: every output element within the bound its score error implies. With each score
/// off by at most `e` (per token and group: `scale * dq / 2 * sum |code - max_code / 2|`, `dq = max|q_g| / 127`
/// for the 8-bit query and `max|q_g| / 16256` for the two-digit one, summed over groups), every softmax weight moves by at most `p_t (exp(2 e) - 1)`, so every output element by at
/// most `(exp(2 e) - 1) max |v|`; `IntDot` adds the error of its integer value sums (bounded below). Also: rayon
/// equals serial, and the kernel is really in use.
#[test]
fn int_dot_keys_stay_within_their_bound() {
    let _lock = lock();
    let mut rng = common::rng(23);
    let mut used = 0;
    for (kernel, qmax) in [(AttnKernel::IntDot8, 127.0), (AttnKernel::IntDot, 16256.0)] {
        set_attn_kernel(Some(kernel));
        for (kb, g) in [(Bits::B4, 64), (Bits::B4, 32), (Bits::B2, 64), (Bits::B8, 16), (Bits::B8, 64), (Bits::B1, 128)]
        {
            for (d, gqa, sink, ctx, tail) in
                [(64, 3, 0, 97, 0), (128, 4, 4, 1000, 37), (128, 1, 0, 15, 5), (64, 5, 1, 33, 0)]
            {
                if g > d {
                    continue;
                }
                let kspec = QuantSpec::new(kb, g, GroupAxis::PerToken);
                let vspec = QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken);
                if key_kernel_for(&kspec, d) == kernel {
                    used += 1;
                }
                let n_kv = 2;
                let heads: Vec<Head> =
                    (0..n_kv).map(|_| Head::new(&mut rng, kspec, vspec, d, sink, ctx, tail)).collect();
                let kv: Vec<HeadKv<'_>> = heads.iter().map(Head::kv).collect();
                let n_q = n_kv * gqa;
                let q = common::gaussian(&mut rng, n_q * d, 1.0);
                let scale = 1.0 / (d as f32).sqrt();
                let mut got = vec![0f32; n_q * d];
                decode_attention(&q, &kv, d, scale, &mut got).unwrap();
                let mut serial = vec![0f32; n_q * d];
                decode_attention_serial(&q, &kv, d, scale, &mut serial).unwrap();
                assert_eq!(serial, got, "serial differs from rayon");
                for (h, head) in heads.iter().enumerate() {
                    let (ks, vs) = head.dequantized(d);
                    let stream = head.k.as_ref().unwrap();
                    let mut codes = vec![0u8; stream.tokens() * d];
                    unpack_ref(kb, stream.view().codes, stream.tokens() * d, &mut codes).unwrap();
                    let view = stream.view();
                    let ng = d / g;
                    let center = kb.max_code() as f64 / 2.0;
                    // `IntDot` also sums per-token values with two-digit weights `w_t = p_t scale_t` per tile of 64
                    // tokens: `p_t <= 1` (the largest is 1 before the division by the sum, itself at least 1), so each
                    // tile adds at most `max scale / 16256 / 2 * sum |code - center|` to an output element.
                    let mut vbound = vec![0f64; d];
                    if kernel == AttnKernel::IntDot {
                        let vstream = head.v.as_ref().unwrap();
                        let vview = vstream.view();
                        let mut vcodes = vec![0u8; vstream.tokens() * d];
                        unpack_ref(vspec.bits, vview.codes, vstream.tokens() * d, &mut vcodes).unwrap();
                        let (vg, vc) = (vspec.group, vspec.bits.max_code() as f64 / 2.0);
                        for (c, b) in vbound.iter_mut().enumerate() {
                            for t0 in (0..vstream.tokens()).step_by(64) {
                                let ts = t0..(t0 + 64).min(vstream.tokens());
                                let smax = ts
                                    .clone()
                                    .map(|t| vview.scales.get(t * (d / vg) + c / vg) as f64)
                                    .fold(0.0, f64::max);
                                let dev: f64 = ts.map(|t| (vcodes[t * d + c] as f64 - vc).abs()).sum();
                                *b += smax / 16256.0 / 2.0 * dev;
                            }
                        }
                    }
                    for r in 0..gqa {
                        let qh = &q[(h * gqa + r) * d..(h * gqa + r + 1) * d];
                        let mut want = vec![0f32; d];
                        attention_ref(qh, &[&ks], &[&vs], d, scale, &mut want).unwrap();
                        let mut e = 0f64;
                        for t in 0..stream.tokens() {
                            let mut et = 0f64;
                            for gi in 0..ng {
                                let amax =
                                    qh[gi * g..(gi + 1) * g].iter().fold(0f64, |m, &x| m.max((x * scale).abs() as f64));
                                let dev: f64 = codes[t * d + gi * g..t * d + (gi + 1) * g]
                                    .iter()
                                    .map(|&c| (c as f64 - center).abs())
                                    .sum();
                                et += view.scales.get(t * ng + gi) as f64 * amax / qmax / 2.0 * dev;
                            }
                            e = e.max(et);
                        }
                        let vmax = vs.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
                        let bound = ((2.0 * e).exp() - 1.0) * vmax + 1e-5 * vmax;
                        let out = &got[(h * gqa + r) * d..(h * gqa + r + 1) * d];
                        for c in 0..d {
                            let err = (out[c] - want[c]).abs() as f64;
                            let total = bound + vbound[c];
                            assert!(
                                err <= total,
                                "{kernel:?} K{kb} g{g} d{d} gqa{gqa} ctx{ctx} c{c}: error {err:e} above {total:e}"
                            );
                        }
                    }
                }
            }
        }
    }
    set_attn_kernel(Some(AttnKernel::Exact));
    if adaquant_kernels::simd::active() >= SimdLevel::Avx512 && std::arch::is_x86_feature_detected!("avx512vnni") {
        assert!(used > 0, "the integer-dot kernel never ran");
    }
}

/// Long heads are split into parts (`attn::PART_TOKENS`, at most `attn::MAX_PARTS`) that are merged by their
/// softmax statistics: against the reference, with sinks and tails, cut points aligned for per-channel keys and
/// 1.58-bit values at once (multiples of 320 tokens), and with the part cap reached.
#[test]
fn split_heads_match_reference() {
    let _lock = lock();
    let mut rng = common::rng(24);
    for (kspec, vspec, ctx) in [
        (
            QuantSpec::new(Bits::B4, 64, GroupAxis::PerChannel),
            QuantSpec::new(Bits::B1_58, 64, GroupAxis::PerToken),
            5000,
        ),
        (QuantSpec::new(Bits::B4, 64, GroupAxis::PerToken), QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken), 20000),
        (QuantSpec::new(Bits::B8, 32, GroupAxis::PerToken), QuantSpec::new(Bits::B4, 32, GroupAxis::PerChannel), 2100),
    ] {
        assert!(ctx >= 2 * adaquant_kernels::attn::PART_TOKENS);
        let case = Case { kspec, vspec, d: 64, n_kv: 2, gqa: 3, sink: 3, ctx, tail: 5 };
        check(&mut rng, &case);
    }
}

#[test]
fn awkward_sizes() {
    let _lock = lock();
    let mut rng = common::rng(21);
    let pairs = [(Bits::B4, Bits::B2), (Bits::B2, Bits::B4), (Bits::B8, Bits::B8), (Bits::B3, Bits::B1_58)];
    let mut n = 0usize;
    for level in levels() {
        set_simd_override(Some(level));
        for ctx in [1, 7, 54, 97, 4097] {
            for gqa in [1, 3, 4] {
                for d in [64, 128] {
                    for tail in [0, 37] {
                        n += 1;
                        // The long context takes one configuration per (gqa, d) to keep the run short.
                        if ctx == 4097 && (tail == 37) == (d == 64) {
                            continue;
                        }
                        let (kb, vb) = pairs[n % pairs.len()];
                        let (ka, va) = AXES[n % AXES.len()];
                        let case = Case {
                            kspec: QuantSpec::new(kb, 32, ka),
                            vspec: QuantSpec::new(vb, if va == GroupAxis::PerToken { 32 } else { 64 }, va),
                            d,
                            n_kv: if gqa == 4 { 2 } else { 3 },
                            gqa,
                            sink: if n.is_multiple_of(3) { 5 } else { 0 },
                            ctx,
                            tail,
                        };
                        check(&mut rng, &case);
                    }
                }
            }
        }
    }
    set_simd_override(None);
}

#[test]
fn fast_levels_agree_with_each_other() {
    let _lock = lock();
    let mut rng = common::rng(22);
    let d = 128;
    let head = Head::new(
        &mut rng,
        QuantSpec::new(Bits::B4, 64, GroupAxis::PerChannel),
        QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken),
        d,
        4,
        700,
        37,
    );
    let q = common::gaussian(&mut rng, 4 * d, 2.0);
    let mut outs = Vec::new();
    for level in levels() {
        set_simd_override(Some(level));
        let mut o = vec![0f32; 4 * d];
        decode_attention(&q, &[head.kv()], d, 0.125, &mut o).unwrap();
        outs.push(o);
    }
    set_simd_override(None);
    for o in &outs[1..] {
        let e = worst_rel_err(o, &outs[0], d);
        assert!(e < 1e-5, "levels differ by {e:e}");
    }
}

#[test]
fn baselines_match_reference() {
    let _lock = lock();
    let mut rng = common::rng(23);
    for level in levels() {
        set_simd_override(Some(level));
        for (d, t, n_kv, gqa) in [(64, 1, 3, 3), (64, 97, 3, 3), (128, 54, 2, 4), (72, 33, 1, 1), (128, 4097, 1, 4)] {
            let k: Vec<Vec<f32>> = (0..n_kv).map(|_| common::gaussian(&mut rng, t * d, 1.0)).collect();
            let v: Vec<Vec<f32>> = (0..n_kv).map(|_| common::gaussian(&mut rng, t * d, 1.0)).collect();
            // Round to f16 first so both baselines see the same numbers.
            let kh: Vec<Vec<f16>> = k.iter().map(|x| x.iter().map(|&a| f16::from_f32(a)).collect()).collect();
            let vh: Vec<Vec<f16>> = v.iter().map(|x| x.iter().map(|&a| f16::from_f32(a)).collect()).collect();
            let k32: Vec<Vec<f32>> = kh.iter().map(|x| x.iter().map(|a| a.to_f32()).collect()).collect();
            let v32: Vec<Vec<f32>> = vh.iter().map(|x| x.iter().map(|a| a.to_f32()).collect()).collect();
            let ks: Vec<&[f32]> = k32.iter().map(Vec::as_slice).collect();
            let vs: Vec<&[f32]> = v32.iter().map(Vec::as_slice).collect();
            let q = common::gaussian(&mut rng, n_kv * gqa * d, 1.0);
            let mut want = vec![0f32; q.len()];
            attention_ref(&q, &ks, &vs, d, 0.1, &mut want).unwrap();
            let mut a = vec![0f32; q.len()];
            attention_f32(&q, &ks, &vs, d, 0.1, &mut a).unwrap();
            assert!(worst_rel_err(&a, &want, d) < 1e-5, "f32 d={d} t={t} {level:?}");
            let khs: Vec<&[f16]> = kh.iter().map(Vec::as_slice).collect();
            let vhs: Vec<&[f16]> = vh.iter().map(Vec::as_slice).collect();
            let mut b = vec![0f32; q.len()];
            attention_f16(&q, &khs, &vhs, d, 0.1, &mut b).unwrap();
            assert!(worst_rel_err(&b, &want, d) < 1e-5, "f16 d={d} t={t} {level:?}");
        }
    }
    set_simd_override(None);
}

#[test]
fn bad_shapes_are_typed_errors() {
    let _lock = lock();
    let d = 64;
    let mut rng = common::rng(24);
    let h = Head::new(
        &mut rng,
        QuantSpec::new(Bits::B4, 32, GroupAxis::PerChannel),
        QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken),
        d,
        0,
        64,
        3,
    );
    let kv = h.kv();
    let q = vec![0.5f32; 3 * d];
    let mut out = vec![0f32; 3 * d];
    // Three query heads cannot share two KV heads.
    assert!(matches!(decode_attention(&q, &[kv, kv], d, 1.0, &mut out), Err(Error::BadGqa { .. })));
    assert!(matches!(decode_attention(&q, &[kv], d, 1.0, &mut out[..5]), Err(Error::ShapeMismatch { .. })));
    // Keys and values of different lengths.
    let short = HeadKv { tail_v: &h.tail_v[..d], ..kv };
    assert!(matches!(decode_attention(&q, &[short], d, 1.0, &mut out), Err(Error::KvLengthMismatch { .. })));
    assert!(matches!(decode_attention_ref(&q, &[short], d, 1.0, &mut out), Err(Error::KvLengthMismatch { .. })));
    let empty = HeadKv::exact(&[], &[]);
    assert!(matches!(decode_attention_serial(&q, &[empty], d, 1.0, &mut out), Err(Error::EmptyContext)));
    let ragged = HeadKv { tail_k: &h.tail_k[..d + 1], ..kv };
    assert!(matches!(decode_attention(&q, &[ragged], d, 1.0, &mut out), Err(Error::ShapeMismatch { .. })));
    assert!(decode_attention(&q, &[kv], d, 1.0, &mut out).is_ok());
    assert!(out.iter().all(|x| x.is_finite()));
}

/// What an attention call returned, in a form that compares across SIMD levels and paths.
fn outcome(r: Result<(), Error>) -> String {
    match r {
        Ok(()) => "Ok".to_string(),
        Err(Error::NonFinite { what, index, .. }) => format!("NonFinite {what} {index}"),
        Err(Error::NonFiniteKv { kv_head, part, index, .. }) => format!("NonFiniteKv {kv_head} {part} {index}"),
        Err(e) => format!("{e:?}"),
    }
}

#[test]
fn non_finite_inputs_are_the_same_typed_error_at_every_simd_level() {
    let _lock = lock();
    let d = 64;
    let mut rng = common::rng(25);
    // Two KV heads (the second gets the bad value), three query heads each; packed K per channel and V per token,
    // with sinks and tails, so every part of a head can hold the bad value.
    let heads: Vec<Head> = (0..2)
        .map(|_| {
            Head::new(
                &mut rng,
                QuantSpec::new(Bits::B4, 32, GroupAxis::PerChannel),
                QuantSpec::new(Bits::B2, 32, GroupAxis::PerToken),
                d,
                2,
                70,
                5,
            )
        })
        .collect();
    let q = common::gaussian(&mut rng, 6 * d, 1.0);
    let parts = ["query", "sink keys", "tail keys", "sink values", "tail values", "key scales", "value minimums"];
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for part in parts {
            let mut q = q.clone();
            let (mut sink_k, mut tail_k) = (heads[1].sink_k.clone(), heads[1].tail_k.clone());
            let (mut sink_v, mut tail_v) = (heads[1].sink_v.clone(), heads[1].tail_v.clone());
            let kp = heads[1].k.as_ref().unwrap().view();
            let vp = heads[1].v.as_ref().unwrap().view();
            let mut k_scales: Vec<f32> = (0..kp.scales.len()).map(|i| kp.scales.get(i)).collect();
            let v_mins: Vec<f32> = (0..vp.mins.len()).map(|i| vp.mins.get(i)).collect();
            let mut v_mins = v_mins;
            let want = match part {
                "query" => {
                    q[4 * d + 5] = bad;
                    "NonFinite query 261".to_string()
                }
                "sink keys" => {
                    sink_k[d + 3] = bad;
                    format!("NonFiniteKv 1 sink keys {}", d + 3)
                }
                "tail keys" => {
                    tail_k[7] = bad;
                    "NonFiniteKv 1 tail keys 7".to_string()
                }
                "sink values" => {
                    sink_v[2] = bad;
                    "NonFiniteKv 1 sink values 2".to_string()
                }
                "tail values" => {
                    tail_v[3 * d + 1] = bad;
                    format!("NonFiniteKv 1 tail values {}", 3 * d + 1)
                }
                "key scales" => {
                    k_scales[40] = bad;
                    "NonFiniteKv 1 packed key scales 40".to_string()
                }
                _ => {
                    v_mins[9] = bad;
                    "NonFiniteKv 1 packed value minimums 9".to_string()
                }
            };
            let k_view =
                adaquant_kernels::PackedView { scales: adaquant_kernels::quant::MetaView::F32(&k_scales), ..kp };
            let v_view = adaquant_kernels::PackedView { mins: adaquant_kernels::quant::MetaView::F32(&v_mins), ..vp };
            let bad_head = HeadKv {
                sink_k: &sink_k,
                sink_v: &sink_v,
                k: Some(k_view),
                v: Some(v_view),
                tail_k: &tail_k,
                tail_v: &tail_v,
            };
            let kv = [heads[0].kv(), bad_head];
            let mut out = vec![0f32; q.len()];
            let r = outcome(decode_attention_ref(&q, &kv, d, 0.125, &mut out));
            assert_eq!(r, want, "reference, {bad} in {part}");
            for level in levels() {
                set_simd_override(Some(level));
                let a = outcome(decode_attention(&q, &kv, d, 0.125, &mut out));
                let b = outcome(decode_attention_serial(&q, &kv, d, 0.125, &mut out));
                assert_eq!(a, want, "decode_attention, {bad} in {part}, {level:?}");
                assert_eq!(b, want, "decode_attention_serial, {bad} in {part}, {level:?}");
            }
            set_simd_override(None);
        }
        // The baselines: f32 keys and values, and f16 ones (an f16 infinity or NaN).
        let t = 41;
        let k: Vec<Vec<f32>> = (0..2).map(|_| common::gaussian(&mut rng, t * d, 1.0)).collect();
        let v: Vec<Vec<f32>> = (0..2).map(|_| common::gaussian(&mut rng, t * d, 1.0)).collect();
        for (which, index) in [("keys", 17 * d + 9), ("values", 40 * d + 63)] {
            let (mut k, mut v) = (k.clone(), v.clone());
            let target = if which == "keys" { &mut k[1] } else { &mut v[1] };
            target[index] = bad;
            let want = format!("NonFiniteKv 1 {which} {index}");
            let ks: Vec<&[f32]> = k.iter().map(Vec::as_slice).collect();
            let vs: Vec<&[f32]> = v.iter().map(Vec::as_slice).collect();
            let kh: Vec<Vec<f16>> = k.iter().map(|x| x.iter().map(|&a| f16::from_f32(a)).collect()).collect();
            let vh: Vec<Vec<f16>> = v.iter().map(|x| x.iter().map(|&a| f16::from_f32(a)).collect()).collect();
            let khs: Vec<&[f16]> = kh.iter().map(Vec::as_slice).collect();
            let vhs: Vec<&[f16]> = vh.iter().map(Vec::as_slice).collect();
            let mut out = vec![0f32; q.len()];
            assert_eq!(outcome(attention_ref(&q, &ks, &vs, d, 0.125, &mut out)), want, "attention_ref {bad}");
            for level in levels() {
                set_simd_override(Some(level));
                let a = outcome(attention_f32(&q, &ks, &vs, d, 0.125, &mut out));
                assert_eq!(a, want, "attention_f32, {bad} in {which}, {level:?}");
                let b = outcome(attention_f16(&q, &khs, &vhs, d, 0.125, &mut out));
                assert_eq!(b, want, "attention_f16, {bad} in {which}, {level:?}");
            }
            set_simd_override(None);
        }
    }
}

#[test]
fn overflowing_scores_are_a_typed_error_at_every_simd_level() {
    let _lock = lock();
    let d = 64;
    let t = 19;
    // Finite inputs whose dot products pass 3.4e38: 1e20 * 1e20 * 64.
    let mut k = vec![0.5f32; t * d];
    k[(t - 1) * d..].fill(1e20);
    let v = vec![1.0f32; t * d];
    let q = vec![1e20f32; 2 * d];
    for level in levels() {
        set_simd_override(Some(level));
        let mut out = vec![0f32; q.len()];
        let r = decode_attention(&q, &[HeadKv::exact(&k, &v)], d, 1.0, &mut out);
        assert!(matches!(r, Err(Error::AttentionOverflow { kv_head: 0 })), "{level:?}: {r:?}");
        let r = attention_f32(&q, &[&k], &[&v], d, 1.0, &mut out);
        assert!(matches!(r, Err(Error::AttentionOverflow { kv_head: 0 })), "{level:?}: {r:?}");
    }
    set_simd_override(None);
}

/// Lloyd-Max views (keys, values or both) on every width with a codebook, both layouts, awkward sizes and group
/// sizes that are and are not multiples of 8, at every SIMD level.
#[test]
fn lloyd_max_views_at_every_simd_level() {
    use adaquant_kernels::Levels;
    let _lock = lock();
    let mut rng = common::rng(25);
    let widths = [Bits::B1, Bits::B1_58, Bits::B2, Bits::B3, Bits::B4];
    let lloyd = |s: QuantSpec| QuantSpec { levels: Levels::LloydMax, ..s };
    let mut n = 0usize;
    for level in levels() {
        set_simd_override(Some(level));
        for (i, kb) in widths.into_iter().enumerate() {
            for (j, vb) in widths.into_iter().enumerate() {
                for (a, (ka, va)) in AXES.into_iter().enumerate() {
                    n += 1;
                    // Head sizes 64 and 128 with groups of 32/64; head size 24 with groups of 12 (not a multiple of
                    // 8, the portable fallback) or 8.
                    let (d, kg, vg) = match n % 3 {
                        0 => (64, 32, 64),
                        1 => (128, 64, 32),
                        _ => (24, if n.is_multiple_of(2) { 12 } else { 8 }, 12),
                    };
                    let kspec = QuantSpec::new(kb, kg, ka);
                    let vspec = QuantSpec::new(vb, vg, va);
                    // Codebook keys, values, or both (the other side min-max).
                    let (kspec, vspec) = match n % 3 {
                        0 => (lloyd(kspec), lloyd(vspec)),
                        1 => (lloyd(kspec), vspec),
                        _ => (kspec, lloyd(vspec)),
                    };
                    let case = Case {
                        kspec,
                        vspec,
                        d,
                        n_kv: 2,
                        gqa: [1, 3, 4, 5][n % 4],
                        sink: (i + a) % 2 * 5,
                        ctx: [1, 7, 54, 97][(i + j) % 4] + if n.is_multiple_of(17) { 2000 } else { 0 },
                        tail: if (i + j + a) % 2 == 0 { 0 } else { 37 },
                    };
                    check(&mut rng, &case);
                }
            }
        }
    }
    set_simd_override(None);
}
