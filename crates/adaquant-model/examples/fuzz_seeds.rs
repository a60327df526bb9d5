//! Writes a seed corpus for the GGUF fuzz target: small valid files covering every metadata value type, every
//! supported tensor type, and a tiny tokenizer, plus files whose arrays would take far more memory than their bytes
//! (refused by the header's memory budget).
//!
//! `cargo run -p adaquant-model --example fuzz_seeds -- fuzz/corpus/gguf_parse`

use adaquant_model::gguf::{GgufWriter, Value};
use adaquant_model::quant::GgmlType;

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus/gguf_parse".into());
    std::fs::create_dir_all(&dir)?;
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();

    let mut w = GgufWriter::new();
    w.meta("u8", Value::U8(1))
        .meta("i8", Value::I8(-1))
        .meta("u16", Value::U16(2))
        .meta("i16", Value::I16(-2))
        .meta("u32", Value::U32(3))
        .meta("i32", Value::I32(-3))
        .meta("f32", Value::F32(0.5))
        .meta("bool", Value::Bool(true))
        .meta("str", Value::String("text".into()))
        .meta("arr", Value::Array(vec![Value::U64(1), Value::U64(2)]))
        .meta("nested", Value::Array(vec![Value::Array(vec![Value::String("x".into())])]))
        .meta("i64", Value::I64(-4))
        .meta("f64", Value::F64(0.25))
        .meta("general.alignment", Value::U32(32));
    seeds.push(("metadata".into(), w.to_bytes()));

    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        let n = ty.block_elems() * 2;
        let bytes: Vec<u8> = (0..ty.bytes_for(n).unwrap_or(0)).map(|i| (i * 37 % 251) as u8).collect();
        let mut w = GgufWriter::new();
        w.tensor_raw("t", &[n], ty.id(), bytes);
        seeds.push((format!("tensor_{ty:?}"), w.to_bytes()));
    }

    let mut w = GgufWriter::new();
    let arch = "llama";
    w.meta("general.architecture", Value::String(arch.into()))
        .meta("llama.block_count", Value::U32(1))
        .meta("llama.context_length", Value::U32(64))
        .meta("llama.embedding_length", Value::U32(8))
        .meta("llama.feed_forward_length", Value::U32(16))
        .meta("llama.attention.head_count", Value::U32(2))
        .meta("llama.attention.head_count_kv", Value::U32(1))
        .meta("llama.rope.freq_base", Value::F32(10000.0))
        .meta("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("smollm".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(["<s>", "a", "b", "ab", "Ġ"].iter().map(|s| Value::String(s.to_string())).collect()),
        )
        .meta("tokenizer.ggml.token_type", Value::Array([3, 1, 1, 1, 1].iter().map(|&t| Value::I32(t)).collect()))
        .meta("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into())]))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(0))
        .tensor_f32("token_embd.weight", &[5, 8], &[0.1; 40]);
    seeds.push(("tiny_model".into(), w.to_bytes()));

    // One byte per element in the file, a 32-byte `Value` in memory: 32 times the file once parsed.
    let mut w = GgufWriter::new();
    w.meta("bytes", Value::Array(vec![Value::U8(0x5a); 4096]));
    seeds.push(("byte_array".into(), w.to_bytes()));
    let mut w = GgufWriter::new();
    w.meta("rows", Value::Array(vec![Value::Array(vec![Value::U8(1); 64]); 64]));
    seeds.push(("nested_byte_arrays".into(), w.to_bytes()));

    for (name, bytes) in seeds {
        std::fs::write(std::path::Path::new(&dir).join(name), bytes)?;
    }
    Ok(())
}
