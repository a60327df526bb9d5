//! Typed errors of the model crate.

/// Errors of checkpoint loading, tokenization and the forward pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file that could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A GGUF file whose bytes do not follow the format (bad magic, truncation, absurd sizes, ...).
    #[error("malformed GGUF at byte {offset}: {msg}")]
    Gguf { offset: usize, msg: String },

    /// A tensor type (ggml type id) that adaquant cannot dequantize.
    #[error("tensor {tensor}: ggml type {type_id} ({name}) is not supported; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K")]
    UnsupportedTensorType { tensor: String, type_id: u32, name: &'static str },

    /// A safetensors file that could not be parsed, or a tensor with an unsupported dtype.
    #[error("safetensors {path}: {msg}")]
    Safetensors { path: String, msg: String },

    /// A required configuration key is missing from the checkpoint.
    #[error("missing configuration key `{key}` in {source_name}")]
    MissingKey { key: String, source_name: String },

    /// An architecture this forward pass does not implement.
    #[error("unsupported architecture `{arch}`; supported: llama, mistral, qwen2, qwen3, gemma3 (gemma3_text in config.json)")]
    UnsupportedArch { arch: String },

    /// A RoPE scaling rule that the forward pass does not implement (it is never silently ignored).
    #[error("RoPE scaling `{kind}` in {source_name} is not implemented; supported: linear, llama3 (config.json) and rope_freqs.weight or linear (GGUF)")]
    UnsupportedRopeScaling { kind: String, source_name: String },

    /// A configuration value that cannot work (zero heads, head counts that do not divide, ...).
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),

    /// A tensor that the architecture needs but the checkpoint lacks.
    #[error("missing tensor `{0}` in the checkpoint")]
    MissingTensor(String),

    /// A tensor whose shape differs from what the configuration implies.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, got: Vec<usize> },

    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A token id outside the vocabulary.
    #[error("token id {id} at position {pos} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },

    /// An input that the forward pass cannot take (empty token list, too long for the cache, bad logits range).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// An error from the KV cache.
    #[error(transparent)]
    Cache(#[from] adaquant_cache::CacheError),
}

impl ModelError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.display().to_string(), source }
    }
}

/// Result alias of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
