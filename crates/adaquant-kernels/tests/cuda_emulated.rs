//! The real kernel sources (`quant.cu`, `attn.cu`), compiled for the CPU with g++ against a small emulation of the
//! CUDA features they use (`src/cuda/emulate.h`: threads per block, barriers, warp shuffles), run on awkward sizes
//! and compared with the host twins: packing and dequantization bit for bit (including appends that share a byte
//! with earlier codes), fused and baseline attention to 1e-5 relative. This checks the kernels' indexing and
//! arithmetic on a machine without a GPU; `tests/cuda_gpu.rs` checks the same on a GPU. Prints SKIPPED where g++ is
//! missing (fails where `ADAQUANT_REQUIRE_GXX` is set, as in CI). Needs neither the `cuda` feature nor NVRTC.

use std::path::{Path, PathBuf};
use std::process::Command;

use adaquant_kernels::cuda::layout::{axis_code, meta_code, AttnParams, DType, KernelSpec, ATTN_TILE, LENS_STRIDE};
use adaquant_kernels::cuda::{quantized_tokens, reference, stream_stride, to_dtype_bytes};
use adaquant_kernels::skip::{skip, Need};
use adaquant_kernels::{Bits, GroupAxis, MetaDtype, QuantSpec};
use rand::{rngs::StdRng, Rng, SeedableRng};

const EMULATE_H: &str = include_str!("../src/cuda/emulate.h");

const HARNESS: &str = r#"
#include <cstdio>
#include <cstdlib>
#include <string>
static std::vector<unsigned char> rd(const std::string& p) {
    FILE* f = fopen(p.c_str(), "rb");
    if (!f) { fprintf(stderr, "missing %s\n", p.c_str()); exit(3); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    std::vector<unsigned char> v(n + 16);
    if (n && fread(v.data(), 1, n, f) != (size_t)n) exit(4);
    fclose(f);
    v.resize(n);
    return v;
}
static void wr(const std::string& p, const void* d, size_t n) {
    FILE* f = fopen(p.c_str(), "wb");
    fwrite(d, 1, n, f);
    fclose(f);
}
int main(int, char** argv) {
    std::string dir = argv[1];
#if defined(ADQ_WIDTH)
    auto ab = rd(dir + "/args.bin");
    std::vector<u64> a(ab.size() / 8);
    memcpy(a.data(), ab.data(), ab.size());
    const u32 heads = a[0], tokens = a[1], d = a[2], axis = a[3], group = a[4], meta = a[5];
    const u64 stride = a[6];
    const u32 t1 = a[7];
    auto x = rd(dir + "/x.bin");
    const u64 n = (u64)tokens * d, groups = n / group;
    const u32 mb = meta == ADQ_META_F16 ? 2 : 4;
    std::vector<u8> codes(heads * stride, 0), sc(heads * groups * mb, 0xff), mn(heads * groups * mb, 0xff);
    std::vector<u32> status = {0xffffffffu, 0, 0, 0};
    for (int part = 0; part < 2; ++part) {
        const u32 b0 = part == 0 ? 0 : t1, b1 = part == 0 ? t1 : tokens, nt = b1 - b0;
        if (nt == 0) continue;
        const u64 ng = (u64)nt * d / group, g0 = (u64)b0 * d / group, e0 = (u64)b0 * d;
        adq_emu_launch({(unsigned)((ng + 255) / 256), heads, 1}, 256, 0, false, [&] {
            adq_quant_meta(x.data(), ADQ_DTYPE_F32, n, b0, tokens, nt, d, axis, group, sc.data(), mn.data(), meta,
                           groups, g0, status.data());
        });
        const i64 bb = adq_byte_of<ADQ_WIDTH>(e0), be = adq_byte_end<ADQ_WIDTH>(e0 + (u64)nt * d);
        adq_emu_launch({(unsigned)((be - bb + 255) / 256), heads, 1}, 256, 0, false, [&] {
            adq_pack(x.data(), ADQ_DTYPE_F32, n, b0, tokens, nt, d, axis, group, sc.data(), mn.data(), meta, groups,
                     codes.data(), stride, e0);
        });
    }
    std::vector<float> out(heads * n, NAN);
    adq_emu_launch({(unsigned)((n + 255) / 256), heads, 1}, 256, 0, false, [&] {
        adq_dequant(codes.data(), stride, 0, tokens, d, axis, group, sc.data(), mn.data(), meta, groups, out.data(),
                    ADQ_DTYPE_F32, n);
    });
    wr(dir + "/codes.bin", codes.data(), codes.size());
    wr(dir + "/scale.bin", sc.data(), sc.size());
    wr(dir + "/min.bin", mn.data(), mn.size());
    wr(dir + "/deq.bin", out.data(), out.size() * 4);
    wr(dir + "/status.bin", status.data(), 16);
#else
    auto pb = rd(dir + "/params.bin");
    AdqAttnParams p;
    memcpy(&p, pb.data(), sizeof p);
    auto lens = rd(dir + "/lens.bin");
    auto q = rd(dir + "/q.bin");
    const u64 rows = (u64)p.batch * p.n_q_heads * p.n_splits;
    std::vector<float> acc(rows * D, NAN), ml(rows * 2, NAN);
#if ADQ_BASELINE
    auto k = rd(dir + "/k.bin");
    auto v = rd(dir + "/v.bin");
    adq_emu_launch({p.n_splits, p.n_kv_heads, p.batch}, NT, ADQ_SMEM_BYTES, true, [&] {
        adq_attn_f16_split(p, (const u32*)lens.data(), q.data(), (const u16*)k.data(), (const u16*)v.data(),
                           acc.data(), ml.data());
    });
#else
    auto kq = rd(dir + "/kq.bin"), ksc = rd(dir + "/ksc.bin"), kmn = rd(dir + "/kmn.bin");
    auto vq = rd(dir + "/vq.bin"), vsc = rd(dir + "/vsc.bin"), vmn = rd(dir + "/vmn.bin");
    auto ks = rd(dir + "/ksink.bin"), vs = rd(dir + "/vsink.bin"), kt = rd(dir + "/ktail.bin"), vt = rd(dir + "/vtail.bin");
    adq_emu_launch({p.n_splits, p.n_kv_heads, p.batch}, NT, ADQ_SMEM_BYTES, true, [&] {
        adq_attn_split(p, (const u32*)lens.data(), q.data(), kq.data(), ksc.data(), kmn.data(), vq.data(), vsc.data(),
                       vmn.data(), (const float*)ks.data(), (const float*)vs.data(), (const float*)kt.data(),
                       (const float*)vt.data(), acc.data(), ml.data());
    });
#endif
    std::vector<u8> out((u64)p.batch * p.n_q_heads * D * 4, 0xff);
    adq_emu_launch({p.n_q_heads, p.batch, 1}, D, 0, false, [&] { adq_attn_reduce(p, acc.data(), ml.data(), out.data()); });
    wr(dir + "/out.bin", out.data(), out.size());
#endif
    return 0;
}
"#;

fn gpp() -> Option<&'static str> {
    Command::new("g++").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "g++")
}

/// Compiles the program of `spec` for the CPU; returns the executable.
fn build(spec: &KernelSpec, dir: &Path) -> PathBuf {
    let src = dir.join("prog.cpp");
    let text = format!("{EMULATE_H}\n{}\n{HARNESS}", spec.program());
    std::fs::write(&src, text).unwrap();
    let exe = dir.join("prog");
    let out = Command::new("g++")
        .args(["-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-Wno-unknown-pragmas", "-o"])
        .arg(&exe)
        .arg(&src)
        .args(spec.defines())
        .output()
        .unwrap();
    assert!(out.status.success(), "g++ failed on {}:\n{}", spec.name(), String::from_utf8_lossy(&out.stderr));
    exe
}

fn run(exe: &Path, dir: &Path) {
    let out = Command::new(exe).arg(dir).output().unwrap();
    assert!(out.status.success(), "{} failed:\n{}", exe.display(), String::from_utf8_lossy(&out.stderr));
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("adaquant-emu-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn u64_bytes(x: &[u64]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn meta_bytes(x: &[f32], meta: MetaDtype) -> Vec<u8> {
    match meta {
        MetaDtype::F16 => x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        MetaDtype::F32 => f32_bytes(x),
    }
}

#[test]
fn emulated_quant_kernels_equal_the_twin_bit_for_bit() {
    if gpp().is_none() {
        skip(Need::Gxx, "emulated_quant_kernels_equal_the_twin_bit_for_bit", "g++ not found");
        return;
    }
    let mut seed = 0;
    for bits in Bits::ALL {
        let spec_k = KernelSpec::Quant { bits };
        let dir = tmpdir(&format!("quant-{}", bits.name()));
        let exe = build(&spec_k, &dir);
        for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
            for meta in [MetaDtype::F16, MetaDtype::F32] {
                // The last two shapes sit far from zero with small ranges, where the covering metadata (minimum
                // rounded down, scale rounded up) differs most from rounding each to nearest.
                for (heads, tokens, d, g, t1, offset, spread) in [
                    (3usize, 7usize, 64usize, 16usize, 3usize, 0.0f32, 1.0f32),
                    (2, 96, 64, 32, 32, 300.1, 0.25),
                    (1, 97, 128, 64, 51, -1000.3, 0.005),
                ] {
                    if axis == GroupAxis::PerChannel && (!tokens.is_multiple_of(g) || !t1.is_multiple_of(g)) {
                        continue;
                    }
                    seed += 1;
                    let spec = QuantSpec { meta, ..QuantSpec::new(bits, g, axis) };
                    let x: Vec<f32> = data(heads * tokens * d, seed).iter().map(|v| offset + spread * v).collect();
                    let stride = stream_stride(bits, tokens, d);
                    let args = [heads, tokens, d, axis_code(axis) as usize, g, meta_code(meta) as usize, stride, t1];
                    std::fs::write(dir.join("args.bin"), u64_bytes(&args.map(|v| v as u64))).unwrap();
                    std::fs::write(dir.join("x.bin"), f32_bytes(&x)).unwrap();
                    run(&exe, &dir);
                    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
                    let (codes, sc, mn, deq) = (read("codes.bin"), read("scale.bin"), read("min.bin"), read("deq.bin"));
                    assert_eq!(&read("status.bin")[..4], &[0xff; 4], "no non-finite input");
                    let what = format!("{bits} {axis} {meta:?} heads={heads} t={tokens} d={d} g={g} split at {t1}");
                    let n = tokens * d;
                    let groups = n / g;
                    for h in 0..heads {
                        let want = reference::quantize_ref(&x[h * n..(h + 1) * n], tokens, d, &spec).unwrap();
                        assert_eq!(&codes[h * stride..h * stride + want.codes.len()], &want.codes[..], "codes: {what}");
                        let mb = meta.bytes();
                        assert_eq!(&sc[h * groups * mb..(h + 1) * groups * mb], &meta_bytes(&want.scale, meta)[..]);
                        assert_eq!(&mn[h * groups * mb..(h + 1) * groups * mb], &meta_bytes(&want.min, meta)[..]);
                        let back = reference::dequantize_ref(&want, tokens, d, &spec);
                        assert_eq!(&deq[h * n * 4..(h + 1) * n * 4], &f32_bytes(&back)[..], "dequantize: {what}");
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

struct Layout {
    lens: Vec<usize>,
    gqa: usize,
    h: usize,
    d: usize,
    k: QuantSpec,
    v: QuantSpec,
    residual: usize,
    sinks: usize,
}

/// Quantizes a block of `tokens` tokens: (codes, scales, minimums, dequantized values). Uniform sides use the
/// CUDA host twin; Lloyd-Max sides (no minimums) use the CPU quantizer, whose packed layout the GPU shares.
fn quantize_side(block: &[f32], tokens: usize, d: usize, spec: &QuantSpec) -> (Vec<u8>, Vec<f32>, Vec<f32>, Vec<f32>) {
    if spec.is_codebook() {
        let s = adaquant_kernels::quant::quantize(spec, d, block).unwrap();
        let v = s.view();
        let scales = (0..v.scales.len()).map(|i| v.scales.get(i)).collect();
        let mut deq = vec![0f32; block.len()];
        adaquant_kernels::quant::dequantize_ref(&v, &mut deq).unwrap();
        return (v.codes.to_vec(), scales, Vec::new(), deq);
    }
    let p = reference::quantize_ref(block, tokens, d, spec).unwrap();
    let deq = reference::dequantize_ref(&p, tokens, d, spec);
    (p.codes, p.scale, p.min, deq)
}

/// Lays a batch out exactly as `DeviceKvCache` does (streams, metadata, sinks, tail rings with non-zero starts),
/// runs the emulated fused kernel, and compares with the f64 reference over the same tokens.
fn fused_case(c: &Layout, seed: u64) {
    let spec = if c.k.is_codebook() {
        assert!(c.v.is_codebook(), "the Lloyd-Max kernels take Lloyd-Max keys and values");
        KernelSpec::AttnLloyd { k: c.k.bits, v: c.v.bits, head_dim: c.d }
    } else {
        KernelSpec::Attn { k: c.k.bits, v: c.v.bits, head_dim: c.d }
    };
    let dir = tmpdir(&format!("attn-{seed}"));
    let exe = build(&spec, &dir);
    let (h, d, batch) = (c.h, c.d, c.lens.len());
    let hq = h * c.gqa;
    let cap = c.lens.iter().max().unwrap().div_ceil(ATTN_TILE) * ATTN_TILE;
    let wcap = c.residual + 64 + 5;
    let sink_cap = c.sinks.max(1);
    let sides = [c.k, c.v];
    let mut codes = [vec![], vec![]];
    let mut scs = [vec![], vec![]];
    let mut mns = [vec![], vec![]];
    let mut sinkb = [vec![0f32; batch * h * sink_cap * d], vec![0f32; batch * h * sink_cap * d]];
    let mut tailb = [vec![f32::NAN; batch * h * wcap * d], vec![f32::NAN; batch * h * wcap * d]];
    let strides = sides.map(|s| stream_stride(s.bits, cap, d));
    let gcaps = sides.map(|s| cap * d / s.group);
    for si in 0..2 {
        codes[si] = vec![0u8; batch * h * strides[si]];
        scs[si] = vec![0u8; batch * h * gcaps[si] * sides[si].meta.bytes()];
        mns[si] = scs[si].clone();
    }
    let mut lens = vec![0u32; batch * LENS_STRIDE];
    let mut keys = Vec::new();
    let mut vals = Vec::new();
    for (b, &t) in c.lens.iter().enumerate() {
        let x = [data(t * h * d, seed * 100 + 2 * b as u64), data(t * h * d, seed * 100 + 2 * b as u64 + 1)];
        let s = t.min(c.sinks);
        let ring = [(3 * b + 1) % wcap, (7 * b + 2) % wcap];
        let mut q = [0; 2];
        for si in 0..2 {
            let spec = &sides[si];
            q[si] = quantized_tokens(spec, t, c.residual, c.sinks);
            for head in 0..h {
                let sid = b * h + head;
                let row = |tt: usize| &x[si][(tt * h + head) * d..][..d];
                for tt in 0..s {
                    sinkb[si][(sid * sink_cap + tt) * d..][..d].copy_from_slice(row(tt));
                }
                if q[si] > 0 {
                    let block: Vec<f32> = (s..s + q[si]).flat_map(row).copied().collect();
                    let (pc, ps, pm, _) = quantize_side(&block, q[si], d, spec);
                    codes[si][sid * strides[si]..][..pc.len()].copy_from_slice(&pc);
                    let mb = spec.meta.bytes();
                    scs[si][sid * gcaps[si] * mb..][..ps.len() * mb].copy_from_slice(&meta_bytes(&ps, spec.meta));
                    mns[si][sid * gcaps[si] * mb..][..pm.len() * mb].copy_from_slice(&meta_bytes(&pm, spec.meta));
                }
                for (j, tt) in (s + q[si]..t).enumerate() {
                    let slot = (ring[si] + j) % wcap;
                    tailb[si][(sid * wcap + slot) * d..][..d].copy_from_slice(row(tt));
                }
            }
        }
        lens[b * LENS_STRIDE..b * LENS_STRIDE + 6].copy_from_slice(&[
            q[0] as u32,
            q[1] as u32,
            s as u32,
            t as u32,
            ring[0] as u32,
            ring[1] as u32,
        ]);
        keys.push(x[0].clone());
        vals.push(x[1].clone());
    }
    let max_len = *c.lens.iter().max().unwrap();
    let chunk = 2 * ATTN_TILE;
    let p = AttnParams {
        batch: batch as u32,
        n_q_heads: hq as u32,
        n_kv_heads: h as u32,
        gqa: c.gqa as u32,
        k_axis: axis_code(c.k.axis),
        k_group_shift: c.k.group.trailing_zeros(),
        v_axis: axis_code(c.v.axis),
        v_group_shift: c.v.group.trailing_zeros(),
        meta_dtype: meta_code(c.k.meta),
        q_dtype: DType::F32.code(),
        chunk: chunk as u32,
        n_splits: max_len.div_ceil(chunk) as u32,
        sink_cap: sink_cap as u32,
        window_cap: wcap as u32,
        k_stream_stride: strides[0] as u64,
        v_stream_stride: strides[1] as u64,
        k_meta_stride: gcaps[0] as u64,
        v_meta_stride: gcaps[1] as u64,
        sm_scale: 1.0 / (d as f32).sqrt(),
        reserved: 0,
    };
    let q = data(batch * hq * d, seed + 999);
    write_params(&dir, &p, &lens, &q);
    for (name, bytes) in
        [("kq", &codes[0]), ("vq", &codes[1]), ("ksc", &scs[0]), ("kmn", &mns[0]), ("vsc", &scs[1]), ("vmn", &mns[1])]
    {
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
    for (name, x) in [("ksink", &sinkb[0]), ("vsink", &sinkb[1]), ("ktail", &tailb[0]), ("vtail", &tailb[1])] {
        std::fs::write(dir.join(format!("{name}.bin")), f32_bytes(x)).unwrap();
    }
    run(&exe, &dir);
    let out: Vec<f32> = std::fs::read(dir.join("out.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for (b, &t) in c.lens.iter().enumerate() {
        let view = |x: &[f32], spec: &QuantSpec| -> Vec<f32> {
            let s = t.min(c.sinks);
            let qn = quantized_tokens(spec, t, c.residual, c.sinks);
            (0..h)
                .flat_map(|head| {
                    let row = |tt: usize| x[(tt * h + head) * d..][..d].to_vec();
                    let mut o: Vec<f32> = (0..s).flat_map(row).collect();
                    if qn > 0 {
                        let block: Vec<f32> = (s..s + qn).flat_map(row).collect();
                        o.extend(quantize_side(&block, qn, d, spec).3);
                    }
                    o.extend((s + qn..t).flat_map(row));
                    o
                })
                .collect()
        };
        let want = reference::attention_ref(
            &q[b * hq * d..(b + 1) * hq * d],
            &view(&keys[b], &c.k),
            &view(&vals[b], &c.v),
            hq,
            h,
            d,
            p.sm_scale,
        );
        check(&out[b * hq * d..(b + 1) * hq * d], &want, &format!("fused {} sequence {b} (t={t})", spec.name()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_params(dir: &Path, p: &AttnParams, lens: &[u32], q: &[f32]) {
    // SAFETY: AttnParams is #[repr(C)] plain data; its bytes are what the kernel receives.
    let pb =
        unsafe { std::slice::from_raw_parts((p as *const AttnParams).cast::<u8>(), std::mem::size_of::<AttnParams>()) };
    std::fs::write(dir.join("params.bin"), pb).unwrap();
    std::fs::write(dir.join("lens.bin"), lens.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    std::fs::write(dir.join("q.bin"), to_dtype_bytes(q, DType::F32)).unwrap();
}

fn check(got: &[f32], want: &[f32], what: &str) {
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite output {got:?}");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(err <= 1e-5, "{what}: relative error {err}");
}

#[test]
fn emulated_fused_attention_equals_the_reference() {
    if gpp().is_none() {
        skip(Need::Gxx, "emulated_fused_attention_equals_the_reference", "g++ not found");
        return;
    }
    let kivi = |kb, vb, g| (QuantSpec::new(kb, g, GroupAxis::PerChannel), QuantSpec::new(vb, g, GroupAxis::PerToken));
    let (k4, v2) = kivi(Bits::B4, Bits::B2, 32);
    fused_case(&Layout { lens: vec![1, 54, 197], gqa: 4, h: 2, d: 128, k: k4, v: v2, residual: 16, sinks: 4 }, 1);
    fused_case(
        &Layout {
            lens: vec![300, 97],
            gqa: 8,
            h: 1,
            d: 64,
            k: QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(Bits::B3, 64, GroupAxis::PerChannel) },
            v: QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(Bits::B1_58, 16, GroupAxis::PerToken) },
            residual: 20,
            sinks: 0,
        },
        2,
    );
    fused_case(
        &Layout {
            lens: vec![233, 1, 129],
            gqa: 1,
            h: 3,
            d: 64,
            k: QuantSpec::new(Bits::B5, 32, GroupAxis::PerToken),
            v: QuantSpec::new(Bits::B6, 16, GroupAxis::PerChannel),
            residual: 8,
            sinks: 2,
        },
        3,
    );
}

#[test]
fn emulated_lloyd_max_attention_equals_the_reference() {
    if gpp().is_none() {
        skip(Need::Gxx, "emulated_lloyd_max_attention_equals_the_reference", "g++ not found");
        return;
    }
    let lloyd = |s: QuantSpec| QuantSpec { levels: adaquant_kernels::Levels::LloydMax, ..s };
    fused_case(
        &Layout {
            lens: vec![1, 54, 197],
            gqa: 4,
            h: 2,
            d: 128,
            k: lloyd(QuantSpec::new(Bits::B4, 32, GroupAxis::PerChannel)),
            v: lloyd(QuantSpec::new(Bits::B2, 32, GroupAxis::PerToken)),
            residual: 16,
            sinks: 4,
        },
        11,
    );
    fused_case(
        &Layout {
            lens: vec![300, 97],
            gqa: 3,
            h: 1,
            d: 64,
            k: lloyd(QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(Bits::B3, 64, GroupAxis::PerToken) }),
            v: lloyd(QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(Bits::B1_58, 16, GroupAxis::PerChannel) }),
            residual: 20,
            sinks: 0,
        },
        12,
    );
    fused_case(
        &Layout {
            lens: vec![233, 1, 129],
            gqa: 1,
            h: 3,
            d: 64,
            k: lloyd(QuantSpec::new(Bits::B1, 16, GroupAxis::PerToken)),
            v: lloyd(QuantSpec::new(Bits::B4, 64, GroupAxis::PerToken)),
            residual: 8,
            sinks: 2,
        },
        13,
    );
}

#[test]
fn emulated_f16_baseline_equals_the_reference() {
    if gpp().is_none() {
        skip(Need::Gxx, "emulated_f16_baseline_equals_the_reference", "g++ not found");
        return;
    }
    for (d, gqa, h, lens) in [(64usize, 4usize, 2usize, vec![1usize, 70, 200]), (128, 8, 1, vec![129, 5])] {
        let spec = KernelSpec::AttnF16 { head_dim: d };
        let dir = tmpdir(&format!("f16-{d}"));
        let exe = build(&spec, &dir);
        let batch = lens.len();
        let hq = h * gqa;
        let cap = *lens.iter().max().unwrap();
        let round = |x: f32| half::f16::from_f32(x);
        let mut kb = vec![half::f16::ZERO; batch * h * cap * d];
        let mut vb = kb.clone();
        let mut lensb = vec![0u32; batch * LENS_STRIDE];
        let mut kv = Vec::new();
        for (b, &t) in lens.iter().enumerate() {
            let k = data(h * t * d, 10 + b as u64);
            let v = data(h * t * d, 20 + b as u64);
            for head in 0..h {
                for i in 0..t * d {
                    kb[((b * h + head) * cap) * d + i] = round(k[head * t * d + i]);
                    vb[((b * h + head) * cap) * d + i] = round(v[head * t * d + i]);
                }
            }
            lensb[b * LENS_STRIDE + 3] = t as u32;
            kv.push((k, v));
        }
        let chunk = ATTN_TILE;
        let p = AttnParams {
            batch: batch as u32,
            n_q_heads: hq as u32,
            n_kv_heads: h as u32,
            gqa: gqa as u32,
            q_dtype: DType::F32.code(),
            chunk: chunk as u32,
            n_splits: cap.div_ceil(chunk) as u32,
            sink_cap: 1,
            window_cap: cap as u32,
            sm_scale: 0.125,
            ..AttnParams::default()
        };
        let q = data(batch * hq * d, 5);
        write_params(&dir, &p, &lensb, &q);
        std::fs::write(dir.join("k.bin"), kb.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        std::fs::write(dir.join("v.bin"), vb.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        run(&exe, &dir);
        let out: Vec<f32> = std::fs::read(dir.join("out.bin"))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (b, (k, v)) in kv.iter().enumerate() {
            let r = |x: &[f32]| x.iter().map(|&y| round(y).to_f32()).collect::<Vec<f32>>();
            let want = reference::attention_ref(&q[b * hq * d..(b + 1) * hq * d], &r(k), &r(v), hq, h, d, p.sm_scale);
            check(&out[b * hq * d..(b + 1) * hq * d], &want, &format!("f16 baseline d={d} sequence {b}"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
