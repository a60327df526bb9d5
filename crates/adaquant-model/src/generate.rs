//! Greedy generation, the `adaquant generate` command.

use std::io::Write;
use std::path::PathBuf;

use adaquant_cache::{CacheShape, CacheSpec, KvCache};
use anyhow::Context;

use crate::{ForwardOptions, LogitsRange, Model, Result};

/// Turns a `--cache` specification and a cache shape into a cache.
pub type CacheBuilder = dyn Fn(&str, CacheShape) -> anyhow::Result<Box<dyn KvCache>>;

/// Arguments of `adaquant generate`.
#[derive(Clone, Debug, clap::Args)]
pub struct GenerateArgs {
    /// A .gguf file or a Hugging Face folder (default: the SmolLM2-135M-Instruct GGUF in the data folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// KV cache: `f32` (default), `f16`, a shorthand such as `k4v2` or `k8v4-g32-r64`, inline JSON, or a JSON file.
    #[arg(long)]
    pub cache: Option<String>,
}

/// The result of a greedy generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Prompt tokens.
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens (the stop token excluded).
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Whether a stop token ended the generation.
    pub stopped: bool,
}

/// Stop tokens of a model: EOS, and `<|im_end|>` / `<|eot_id|>` / `<|end|>` when the vocabulary has them.
pub fn stop_tokens(model: &Model) -> Vec<u32> {
    let t = model.tokenizer();
    let mut v: Vec<u32> = t.eos_id().into_iter().collect();
    for s in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"] {
        if let Some(id) = t.token_id(s) {
            if !v.contains(&id) {
                v.push(id);
            }
        }
    }
    v
}

/// Greedy decoding of `prompt` (tokens) through `cache` for at most `max_tokens` tokens; `on_token` sees each new
/// token as it is produced.
pub fn generate_tokens(
    model: &Model,
    prompt: &[u32],
    max_tokens: usize,
    cache: &mut dyn KvCache,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, bool)> {
    let stops = stop_tokens(model);
    let mut out = Vec::new();
    let mut logits = model.forward(prompt, cache, &mut ForwardOptions::new(LogitsRange::Last))?;
    for _ in 0..max_tokens {
        let next = logits.argmax(0);
        if stops.contains(&next) {
            return Ok((out, true));
        }
        out.push(next);
        on_token(next);
        if out.len() == max_tokens {
            break;
        }
        logits = model.forward(&[next], cache, &mut ForwardOptions::new(LogitsRange::Last))?;
    }
    Ok((out, false))
}

/// Greedy generation from text: applies the chat template when `chat`, tokenizes, decodes.
pub fn generate_text(
    model: &Model,
    prompt: &str,
    chat: bool,
    max_tokens: usize,
    cache: &mut dyn KvCache,
) -> Result<Generation> {
    let text = if chat { model.tokenizer().apply_chat_template(prompt)? } else { prompt.to_string() };
    let prompt_tokens = model.tokenizer().encode(&text, false)?;
    let (tokens, stopped) = generate_tokens(model, &prompt_tokens, max_tokens, cache, |_| {})?;
    let text = model.tokenizer().decode(&tokens)?;
    Ok(Generation { prompt_tokens, tokens, text, stopped })
}

/// Builds the cache a `--cache` specification names, in any form [`CacheSpec::parse_arg`] accepts: a short name
/// (`f32`, `f16`, `k4v2`, `k8v4-g32-r64`, ...), inline JSON (starting with `{`), or a JSON file.
pub fn build_cache(spec: &str, shape: CacheShape) -> anyhow::Result<Box<dyn KvCache>> {
    let parsed = CacheSpec::parse_arg(spec).with_context(|| format!("--cache '{spec}'"))?;
    Ok(parsed.build(shape)?)
}

/// `adaquant generate` with any cache [`CacheSpec::parse_arg`] understands; a bad `--cache` is reported before
/// the model is loaded.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let text = args.cache.as_deref().unwrap_or("f32");
    let spec = CacheSpec::parse_arg(text).with_context(|| format!("--cache '{text}'"))?;
    run_with(args, &move |_, shape| Ok(spec.build(shape)?))
}

/// `adaquant generate`, with `make_cache` turning the `--cache` specification (default `f32`) and the model's
/// cache shape into a cache.
pub fn run_with(args: &GenerateArgs, make_cache: &CacheBuilder) -> anyhow::Result<()> {
    let path = args.model.clone().unwrap_or_else(crate::paths::default_model);
    let t0 = std::time::Instant::now();
    let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let text = if args.chat { model.tokenizer().apply_chat_template(&args.prompt)? } else { args.prompt.clone() };
    let prompt = model.tokenizer().encode(&text, false)?;
    let max_len = (prompt.len() + args.max_tokens + 1).min(model.config.max_seq_len.max(prompt.len() + 1));
    let spec = args.cache.as_deref().unwrap_or("f32");
    let mut cache = make_cache(spec, model.cache_shape(max_len))?;
    eprintln!(
        "model {} loaded in {load_s:.1} s; cache {}; prompt {} tokens",
        path.display(),
        cache.describe(),
        prompt.len()
    );
    let mut stdout = std::io::stdout();
    let mut prev = String::new();
    let mut all = Vec::new();
    let t1 = std::time::Instant::now();
    let (tokens, stopped) = generate_tokens(&model, &prompt, args.max_tokens, cache.as_mut(), |id| {
        // Print the newly completed text; decoding the whole answer keeps multi-byte characters intact.
        all.push(id);
        if let Ok(s) = model.tokenizer().decode(&all) {
            if let Some(new) = s.strip_prefix(prev.as_str()) {
                let _ = write!(stdout, "{new}");
                let _ = stdout.flush();
            }
            prev = s;
        }
    })?;
    let dt = t1.elapsed().as_secs_f64();
    println!();
    let mem = cache.memory();
    eprintln!(
        "{} tokens in {dt:.2} s ({:.1} tokens/s incl. prefill){}; cache holds {} bytes ({:.2} bits/element)",
        tokens.len(),
        tokens.len() as f64 / dt.max(1e-9),
        if stopped { ", stopped at end of turn" } else { "" },
        mem.total_bytes(),
        mem.bits_per_element()
    );
    Ok(())
}
