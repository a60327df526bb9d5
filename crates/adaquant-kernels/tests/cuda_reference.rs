//! The host twins of the CUDA kernels (`cuda::reference`) agree with the CPU kernels: packed codes and stored
//! metadata bit for bit, dequantized values exactly, attention to f64 rounding. So a GPU result that equals the
//! twin equals the CPU. Runs everywhere.

use adaquant_kernels::cuda::reference;
use adaquant_kernels::{attn, quant, Bits, GroupAxis, MetaDtype, QuantSpec};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect()
}

#[test]
fn twin_quantizer_equals_the_cpu_quantizer_bit_for_bit() {
    let mut cases = 0;
    for bits in Bits::ALL {
        for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
            for meta in [MetaDtype::F16, MetaDtype::F32] {
                for (tokens, d, g) in [(1usize, 64, 32), (54, 64, 64), (96, 128, 32), (97, 128, 16), (128, 64, 64)] {
                    if axis == GroupAxis::PerChannel && !tokens.is_multiple_of(g) {
                        continue;
                    }
                    let spec = QuantSpec { meta, ..QuantSpec::new(bits, g, axis) };
                    // Every other case sits far from zero with a small range (covering metadata at work).
                    let (offset, spread) = [(0.0f32, 1.0f32), (300.1, 0.1), (-1000.3, 0.003)][cases as usize % 3];
                    let x: Vec<f32> = data(tokens * d, cases).iter().map(|v| offset + spread * v).collect();
                    let twin = reference::quantize_ref(&x, tokens, d, &spec).unwrap();
                    let cpu = quant::quantize_ref(&spec, d, &x).unwrap();
                    let view = cpu.view();
                    assert_eq!(twin.codes, view.codes, "{bits} {axis} {meta:?} t={tokens} d={d} g={g}");
                    for i in 0..twin.scale.len() {
                        assert_eq!(twin.scale[i].to_bits(), view.scales.get(i).to_bits(), "scale {i}");
                        assert_eq!(twin.min[i].to_bits(), view.mins.get(i).to_bits(), "min {i}");
                    }
                    let mut deq = vec![0f32; tokens * d];
                    quant::dequantize_ref(&view, &mut deq).unwrap();
                    assert_eq!(reference::dequantize_ref(&twin, tokens, d, &spec), deq);
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 100, "{cases}");
}

#[test]
fn twin_attention_equals_the_cpu_reference() {
    let (hq, hkv, d, t) = (8, 2, 64, 97);
    let q = data(hq * d, 1);
    let k = data(hkv * t * d, 2);
    let v = data(hkv * t * d, 3);
    let scale = 1.0 / (d as f32).sqrt();
    let twin = reference::attention_ref(&q, &k, &v, hq, hkv, d, scale);
    let keys: Vec<&[f32]> = k.chunks(t * d).collect();
    let values: Vec<&[f32]> = v.chunks(t * d).collect();
    let mut cpu = vec![0f32; hq * d];
    attn::attention_ref(&q, &keys, &values, d, scale, &mut cpu).unwrap();
    for (a, b) in twin.iter().zip(&cpu) {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    }
}
