//! The CUDA preamble equals the Rust layout definitions, and every `ADQ_*` name the kernel sources use is defined.
//! Runs everywhere: neither the `cuda` feature nor NVRTC is needed.

use std::collections::{BTreeSet, HashMap};

use adaquant_kernels::cuda::layout::{
    self, AttnParams, AttnSmem, DType, KernelSpec, ATTN_THREADS, ATTN_TILE, LENS_STRIDE, MAX_GQA, MIN_ATTN_GROUP,
    PAD_BYTES,
};
use adaquant_kernels::{Bits, GroupAxis, MetaDtype};

fn defines() -> HashMap<String, i64> {
    let text = layout::preamble();
    let mut map = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("#define ")) {
        let mut parts = line["#define ".len()..].split_whitespace();
        let name = parts.next().expect("a name").to_string();
        let value: i64 = parts.next().expect("a value").parse().unwrap_or_else(|_| panic!("numeric value: {line}"));
        assert!(map.insert(name.clone(), value).is_none(), "{name} defined twice");
    }
    map
}

#[test]
fn width_constants_equal_the_rust_definitions() {
    let d = defines();
    assert_eq!(d["ADQ_NUM_WIDTHS"], Bits::ALL.len() as i64);
    for (i, b) in Bits::ALL.iter().enumerate() {
        let key = |f: &str| format!("ADQ_W{i}_{f}");
        assert_eq!(d[&format!("ADQ_WIDTH_ID_{}", b.name().replace('.', "_"))], i as i64);
        assert_eq!(d[&key("LEVELS")], i64::from(b.levels()), "{b}");
        let (codes, bytes) = b.unit();
        assert_eq!(d[&key("UNIT_CODES")], codes as i64, "{b}");
        assert_eq!(d[&key("UNIT_BYTES")], bytes as i64, "{b}");
        let ternary = *b == Bits::B1_58;
        assert_eq!(d[&key("TERNARY")], i64::from(ternary), "{b}");
        if ternary {
            assert_eq!(d[&key("CODE_BITS")], 0);
            assert_eq!(3i64.pow(codes as u32), 243, "five base-3 digits fill a byte");
        } else {
            // A unit of 8 codes is exactly `bits` bytes, and a long stream is exactly `bits` bits per code.
            assert_eq!(d[&key("CODE_BITS")], b.nominal() as i64);
            assert_eq!(d[&key("UNIT_BYTES")] * 8, d[&key("UNIT_CODES")] * d[&key("CODE_BITS")], "{b}");
            assert_eq!(b.packed_bytes(8000) as i64, 1000 * d[&key("UNIT_BYTES")], "{b}");
        }
    }
}

#[test]
fn enum_codes_sizes_and_tiles_equal_the_rust_definitions() {
    let d = defines();
    assert_eq!(d["ADQ_AXIS_PER_TOKEN"], i64::from(layout::axis_code(GroupAxis::PerToken)));
    assert_eq!(d["ADQ_AXIS_PER_CHANNEL"], i64::from(layout::axis_code(GroupAxis::PerChannel)));
    assert_ne!(d["ADQ_AXIS_PER_TOKEN"], d["ADQ_AXIS_PER_CHANNEL"]);
    for m in [MetaDtype::F16, MetaDtype::F32] {
        let name = format!("{m:?}").to_uppercase();
        assert_eq!(d[&format!("ADQ_META_{name}")], i64::from(layout::meta_code(m)));
        assert_eq!(d[&format!("ADQ_META_{name}_BYTES")], m.bytes() as i64);
    }
    for t in [DType::F32, DType::F16, DType::Bf16] {
        assert_eq!(d[&format!("ADQ_DTYPE_{}", format!("{t:?}").to_uppercase())], i64::from(t.code()));
    }
    assert_eq!(d["ADQ_PAD_BYTES"], PAD_BYTES as i64);
    assert_eq!(d["ADQ_ATTN_TILE"], ATTN_TILE as i64);
    assert_eq!(d["ADQ_ATTN_THREADS"], ATTN_THREADS as i64);
    assert_eq!(d["ADQ_MAX_GQA"], MAX_GQA as i64);
    assert_eq!(d["ADQ_MIN_GROUP"], MIN_ATTN_GROUP as i64);
    assert_eq!(d["ADQ_LENS_STRIDE"], LENS_STRIDE as i64);
    assert_eq!(d["ADQ_SIZEOF_ATTN_PARAMS"], std::mem::size_of::<AttnParams>() as i64);
    assert_eq!(d["ADQ_OFFSETOF_ATTN_PARAMS_K_STREAM_STRIDE"], std::mem::offset_of!(AttnParams, k_stream_stride) as i64);
    assert_eq!(d["ADQ_OFFSETOF_ATTN_PARAMS_SM_SCALE"], std::mem::offset_of!(AttnParams, sm_scale) as i64);
}

#[test]
fn specialisation_defines_match_their_specs() {
    for spec in KernelSpec::all() {
        let opts = spec.defines();
        let get = |name: &str| {
            opts.iter().find_map(|o| o.strip_prefix(&format!("-D{name}="))).map(|v| v.parse::<usize>().unwrap())
        };
        match spec {
            KernelSpec::Quant { bits } => assert_eq!(get("ADQ_WIDTH"), Some(layout::width_id(bits))),
            KernelSpec::Attn { k, v, head_dim } => {
                assert_eq!(get("ADQ_K_WIDTH"), Some(layout::width_id(k)));
                assert_eq!(get("ADQ_V_WIDTH"), Some(layout::width_id(v)));
                assert_eq!(get("ADQ_HEAD_DIM"), Some(head_dim));
                assert_eq!(get("ADQ_SMEM_BYTES"), Some(AttnSmem::for_head_dim(head_dim).total));
            }
            KernelSpec::AttnF16 { head_dim } => {
                assert_eq!(get("ADQ_BASELINE"), Some(1));
                assert_eq!(get("ADQ_HEAD_DIM"), Some(head_dim));
            }
            KernelSpec::AttnLloyd { k, v, head_dim } => {
                assert_eq!(get("ADQ_K_WIDTH"), Some(layout::width_id(k)));
                assert_eq!(get("ADQ_V_WIDTH"), Some(layout::width_id(v)));
                assert_eq!(get("ADQ_HEAD_DIM"), Some(head_dim));
                assert_eq!((get("ADQ_K_LLOYD"), get("ADQ_V_LLOYD")), (Some(1), Some(1)));
                let levels = |b: Bits| adaquant_kernels::quant::codebook::levels(b).unwrap();
                let program = spec.program();
                for (b, lv) in [(k, levels(k)), (v, levels(v))] {
                    let id = layout::width_id(b);
                    let list: Vec<String> = lv.iter().map(|l| format!("{l:?}f")).collect();
                    let decl = format!("adq_lloyd_w{id}[{}] = {{{}}};", lv.len(), list.join(", "));
                    assert!(program.contains(&decl), "{} lacks the levels of {b}: {decl}", spec.name());
                }
            }
        }
        assert!(spec.program().starts_with(&layout::preamble()), "{} must start with the preamble", spec.name());
    }
}

/// Upper-case `ADQ_*` identifiers in a text.
fn adq_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if word_start && text[i..].starts_with("ADQ_") {
            let end = text[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(text.len(), |e| i + e);
            if end > i + 4 {
                out.insert(text[i..end].to_string());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn every_adq_name_in_the_kernels_is_defined() {
    let mut known: BTreeSet<String> = defines().into_keys().collect();
    for spec in KernelSpec::all() {
        for o in spec.defines() {
            let name = o.trim_start_matches("-D").split('=').next().unwrap().to_string();
            known.insert(name);
        }
    }
    // emulate.h defines ADQ_EMULATE for the CPU emulation of tests/cuda_emulated.rs.
    let emulate = include_str!("../src/cuda/emulate.h");
    for src in [layout::COMMON_SOURCE, layout::QUANT_SOURCE, layout::ATTN_SOURCE, emulate] {
        for line in src.lines().map(str::trim_start).filter(|l| l.starts_with("#define ")) {
            let name = line["#define ".len()..].split(|c: char| c == '(' || c.is_whitespace()).next().unwrap();
            known.insert(name.to_string());
        }
    }
    for (file, src) in
        [("common.cuh", layout::COMMON_SOURCE), ("quant.cu", layout::QUANT_SOURCE), ("attn.cu", layout::ATTN_SOURCE)]
    {
        let unknown: Vec<String> = adq_names(src).into_iter().filter(|n| !known.contains(n)).collect();
        assert!(unknown.is_empty(), "{file} uses names that nothing defines: {unknown:?}");
    }
}
