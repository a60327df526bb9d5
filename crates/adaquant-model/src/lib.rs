//! Checkpoint loading (GGUF, safetensors), the tokenizer, and a Llama-family forward pass whose attention goes
//! through an `adaquant_cache::KvCache`.

pub mod paths;
