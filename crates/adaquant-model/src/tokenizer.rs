//! The tokenizer: Hugging Face `tokenizers`, loaded from `tokenizer.json` or rebuilt from GGUF metadata.
//!
//! A GGUF file of a gpt2-style BPE model stores the vocabulary (`tokenizer.ggml.tokens`), the merges
//! (`tokenizer.ggml.merges`, "left right" strings), each token's type (`tokenizer.ggml.token_type`, 3 = control,
//! i.e. special) and the name of the pre-tokenizer (`tokenizer.ggml.pre`). adaquant turns them into the same
//! `tokenizer.json` document a Hugging Face checkpoint ships and loads that, so both sources go through one path.
//! A GGUF file of a SentencePiece model (`tokenizer.ggml.model = llama`: Llama 1/2, Gemma) stores pieces, scores
//! and token types; it is encoded with llama.cpp's SentencePiece algorithm ([`crate::spm`]).

use std::path::Path;

use serde_json::{json, Map};

use crate::gguf::{Gguf, Value};
use crate::spm::SpmVocab;
use crate::{ModelError, Result};

/// The GPT-4-style split used by Llama 3 ("llama-bpe" in GGUF) checkpoints.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: like Llama 3's, with every digit on its own.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A text tokenizer with the ids of its special tokens.
pub struct Tokenizer {
    inner: Inner,
    bos: Option<u32>,
    eos: Option<u32>,
    /// The model expects BOS at the start of every sequence (GGUF `tokenizer.ggml.add_bos_token`, or
    /// `add_bos_token` in `tokenizer_config.json`).
    add_bos: bool,
    chat_template: Option<String>,
}

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<SpmVocab>),
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Option<u32>) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_bytes(&bytes, bos, eos)
    }

    /// Parses a `tokenizer.json` document.
    pub fn from_json_bytes(bytes: &[u8], bos: Option<u32>, eos: Option<u32>) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err)?;
        Ok(Tokenizer { inner: Inner::Hf(Box::new(inner)), bos, eos, add_bos: false, chat_template: None })
    }

    /// Sets whether the model expects BOS at the start of every sequence.
    pub fn set_add_bos(&mut self, add_bos: bool) {
        self.add_bos = add_bos;
    }

    /// Whether the model expects BOS at the start of every sequence (llama.cpp's `add_bos`).
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// The SentencePiece tokenizer of a GGUF file (`tokenizer.ggml.model = llama`).
    fn from_gguf_spm(g: &Gguf) -> Result<Tokenizer> {
        let missing =
            |k: &str| ModelError::MissingKey { key: k.to_string(), source_name: "GGUF tokenizer metadata".to_string() };
        let arr = |k: &str| g.get(k).and_then(Value::as_array).ok_or_else(|| missing(k));
        let tokens = arr("tokenizer.ggml.tokens")?;
        let scores = arr("tokenizer.ggml.scores")?;
        let types = arr("tokenizer.ggml.token_type")?;
        let pieces = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ModelError::Tokenizer(format!("token {i} is not a string")))
            })
            .collect::<Result<Vec<_>>>()?;
        let scores = scores
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64().map(|x| x as f32).ok_or_else(|| ModelError::Tokenizer(format!("score {i} is not a number")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types = types
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_i64().ok_or_else(|| ModelError::Tokenizer(format!("token type {i} is not an integer"))))
            .collect::<Result<Vec<_>>>()?;
        let add_space_prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
        let n = pieces.len();
        let vocab = SpmVocab::new(pieces, scores, types, add_space_prefix)?;
        let id = |k: &str| {
            g.get(k).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok()).filter(|&v| (v as usize) < n)
        };
        Ok(Tokenizer {
            inner: Inner::Spm(Box::new(vocab)),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            // llama.cpp's default for SentencePiece vocabularies is to add BOS.
            add_bos: g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(true),
            chat_template: g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string),
        })
    }

    /// Rebuilds the tokenizer stored in GGUF metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let missing =
            |k: &str| ModelError::MissingKey { key: k.to_string(), source_name: "GGUF tokenizer metadata".to_string() };
        let model =
            g.get("tokenizer.ggml.model").and_then(Value::as_str).ok_or_else(|| missing("tokenizer.ggml.model"))?;
        if model == "llama" {
            return Self::from_gguf_spm(g);
        }
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model `{model}` is not supported (gpt2-style byte-level BPE and llama-style \
                 SentencePiece are); use the Hugging Face checkpoint folder with its tokenizer.json instead"
            )));
        }
        let tokens =
            g.get("tokenizer.ggml.tokens").and_then(Value::as_array).ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
        let merges =
            g.get("tokenizer.ggml.merges").and_then(Value::as_array).ok_or_else(|| missing("tokenizer.ggml.merges"))?;
        let types = g.get("tokenizer.ggml.token_type").and_then(Value::as_array);
        let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");

        let mut vocab = Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            let s = t.as_str().ok_or_else(|| ModelError::Tokenizer(format!("token {id} is not a string")))?;
            let ty = types.and_then(|a| a.get(id)).and_then(Value::as_i64).unwrap_or(1);
            // 3 = control (special), 4 = user-defined: both are matched verbatim before BPE runs.
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": ty == 3,
                }));
            }
            vocab.insert(s.to_string(), json!(id));
        }
        let merges: Vec<&str> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| m.as_str().ok_or_else(|| ModelError::Tokenizer(format!("merge {i} is not a string"))))
            .collect::<Result<_>>()?;
        for (i, m) in merges.iter().enumerate() {
            if m.split(' ').count() != 2 {
                return Err(ModelError::Tokenizer(format!("merge {i} `{m}` is not two tokens separated by a space")));
            }
        }
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let byte_level_no_regex =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
        let split =
            |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        let pre_tokenizer = match pre {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            "default" | "gpt2" | "gpt-2" => byte_level,
            "llama-bpe" | "llama3" => {
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level_no_regex]})
            }
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level_no_regex]}),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF pre-tokenizer `{other}` is not supported (known: smollm, gpt2, llama-bpe, qwen2)"
                )))
            }
        };
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let bytes = serde_json::to_vec(&doc).map_err(tok_err)?;
        let id = |k: &str| {
            g.get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
        };
        let mut t =
            Self::from_json_bytes(&bytes, id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id"))?;
        t.chat_template = g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
        t.add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        Ok(t)
    }

    /// Sets the chat template (a Jinja string, as in `tokenizer_config.json`).
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// The chat template, when the checkpoint has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`; with `add_bos`, the beginning-of-sequence token is prepended.
    /// Special tokens written in the text (such as `<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_bos {
            let bos = self
                .bos
                .ok_or_else(|| ModelError::Tokenizer("add_bos requested, but the model has no BOS token".into()))?;
            ids.push(bos);
        }
        match &self.inner {
            Inner::Hf(t) => ids.extend_from_slice(t.encode(text, false).map_err(tok_err)?.get_ids()),
            Inner::Spm(v) => ids.extend(v.encode(text)?),
        }
        Ok(ids)
    }

    /// The text of `ids`, special tokens included. Byte-level pieces that do not form whole UTF-8 characters on
    /// their own are replaced by U+FFFD; whole encodings round-trip exactly.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let n = self.vocab_size();
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= n) {
            return Err(ModelError::TokenOutOfRange { id, pos, vocab: n });
        }
        match &self.inner {
            Inner::Hf(t) => t.decode(ids, false).map_err(tok_err),
            Inner::Spm(v) => v.decode(ids),
        }
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Spm(v) => v.len(),
        }
    }

    /// The id of token string `token`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::Spm(v) => v.piece_id(token),
        }
    }

    /// The string of token `id`.
    pub fn token_str(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Spm(v) => v.piece(id).map(str::to_string),
        }
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token (generation stops there).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Applies the chat template to one user message, ready for the assistant's answer.
    ///
    /// ChatML templates (those using `<|im_start|>`, as SmolLM2 and Qwen2 do) are rendered natively, including the
    /// default system message a template inserts when the conversation has none. Other templates are an error.
    pub fn apply_chat_template(&self, user: &str) -> Result<String> {
        let t = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Tokenizer("the checkpoint has no chat template; run without --chat".into()))?;
        if !t.contains("<|im_start|>") {
            return Err(ModelError::Tokenizer(
                "only ChatML chat templates (<|im_start|> ... <|im_end|>) are supported".into(),
            ));
        }
        let mut out = String::new();
        if let Some(sys) = default_system_message(t) {
            out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        out.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
        Ok(out)
    }
}

/// The default system message a ChatML template inserts when the first message is not a system message.
fn default_system_message(template: &str) -> Option<&str> {
    let start = template
        .find("<|im_start|>system\\n")
        .map(|i| i + "<|im_start|>system\\n".len())
        .or_else(|| template.find("<|im_start|>system\n").map(|i| i + "<|im_start|>system\n".len()))?;
    let rest = &template[start..];
    let end = rest.find("<|im_end|>")?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_message_is_read_from_template() {
        let t = "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{{'<|im_start|>' + message['role']}}";
        assert_eq!(default_system_message(t), Some("You are helpful"));
        assert_eq!(default_system_message("{{'<|im_start|>' + role}}"), None);
    }
}
