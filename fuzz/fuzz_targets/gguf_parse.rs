//! Fuzzes the GGUF header parser, the tensor reader and the configuration and tokenizer built from metadata:
//! any input must give a value or a typed error, never a panic, an out-of-bounds read or a huge allocation.
#![no_main]

use adaquant_model::gguf::Gguf;
use adaquant_model::{ModelConfig, Tokenizer};
use libfuzzer_sys::fuzz_target;

/// Tensors larger than this are not dequantized (the parser has already checked they lie inside the input).
const MAX_ELEMENTS: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(data) else { return };
    for t in &g.tensors {
        if t.n_elements <= MAX_ELEMENTS {
            if let Ok(v) = g.dequantize(data, t) {
                assert_eq!(v.len(), t.n_elements);
            }
        }
    }
    let _ = ModelConfig::from_gguf(&g);
    if g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).is_some_and(|a| a.len() < 4096) {
        let _ = Tokenizer::from_gguf(&g);
    }
});
