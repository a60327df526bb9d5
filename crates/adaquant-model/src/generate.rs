//! Greedy generation, the `adaquant generate` command.

use std::io::Write;
use std::path::PathBuf;

use adaquant_cache::{CacheShape, CacheSpec, KvCache, MemoryReport};
use anyhow::Context;

use crate::{ForwardOptions, LogitsRange, Model, Result};

/// Turns a `--cache` specification and a cache shape into a cache.
pub type CacheBuilder = dyn Fn(&str, CacheShape) -> anyhow::Result<Box<dyn KvCache>>;

/// Arguments of `adaquant generate`.
#[derive(Clone, Debug, clap::Args)]
pub struct GenerateArgs {
    /// A .gguf file or a Hugging Face folder [default: <data>/models/SmolLM2-135M-Instruct.Q4_1.gguf, <data> =
    /// $ADAQUANT_DATA, ./data, or data/ beside the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt (at least one token).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// KV cache: `f32` (default), `f16`, a shorthand such as `k4v2` or `k8v4-g32-r64`, inline JSON, or a JSON file.
    /// Tokens are quantized only once they leave the exact window (128 recent tokens unless `r<n>` says otherwise).
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

/// How much of a cache is quantized: per layer, the key and value tokens held in packed form, and the bits per
/// element of that packed part alone and of the whole cache.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedShare {
    /// Tokens held by the cache (per layer).
    pub tokens: usize,
    /// Quantized key and value tokens of each layer.
    pub layers: Vec<(usize, usize)>,
    /// Bits per quantized element (codes and group metadata); `None` when nothing is quantized.
    pub quantized_bits: Option<f64>,
    /// Bits per element of the whole cache (exact window, sinks and unquantized layers included).
    pub total_bits: f64,
}

impl QuantizedShare {
    /// Reads the share from a cache's memory report. A side holds packed codes only once tokens left its exact
    /// window; its exact tokens are kept as f32 ([`adaquant_cache::quant::EXACT_BYTES`] each), so the quantized
    /// count is what the exact bytes do not cover.
    pub fn of(mem: &MemoryReport, kv_row: usize) -> QuantizedShare {
        let exact = adaquant_cache::quant::EXACT_BYTES * kv_row.max(1);
        let side =
            |code: usize, full: usize, tokens: usize| if code == 0 { 0 } else { tokens - (full / exact).min(tokens) };
        let layers: Vec<(usize, usize)> = mem
            .layers
            .iter()
            .map(|l| (side(l.k_code_bytes, l.k_full_bytes, l.tokens), side(l.v_code_bytes, l.v_full_bytes, l.tokens)))
            .collect();
        let packed: usize =
            mem.layers.iter().map(|l| l.k_code_bytes + l.k_meta_bytes + l.v_code_bytes + l.v_meta_bytes).sum();
        let elements: usize = layers.iter().map(|(k, v)| (k + v) * kv_row).sum();
        QuantizedShare {
            tokens: mem.layers.iter().map(|l| l.tokens).max().unwrap_or(0),
            layers,
            quantized_bits: (elements > 0).then(|| 8.0 * packed as f64 / elements as f64),
            total_bits: mem.bits_per_element(),
        }
    }

    /// Whether no key or value of any layer is quantized.
    pub fn is_none(&self) -> bool {
        self.layers.iter().all(|&(k, v)| k == 0 && v == 0)
    }

    /// One line for people: how many tokens were quantized and at what cost, or that none were.
    pub fn summary(&self) -> String {
        if self.is_none() {
            return format!(
                "nothing was quantized: all {} tokens are still in the exact window or sinks (or the cache is \
                 full precision), so this output is the full-precision output; whole cache {:.2} bits/element",
                self.tokens, self.total_bits
            );
        }
        let range = |f: fn(&(usize, usize)) -> usize| {
            let lo = self.layers.iter().map(f).min().unwrap_or(0);
            let hi = self.layers.iter().map(f).max().unwrap_or(0);
            if lo == hi {
                format!("{lo}")
            } else {
                format!("{lo}-{hi}")
            }
        };
        format!(
            "quantized {} of {} key tokens and {} of {} value tokens per layer ({} layers); quantized part {:.2} \
             bits/element, whole cache {:.2} bits/element (exact window and sinks included)",
            range(|l| l.0),
            self.tokens,
            range(|l| l.1),
            self.tokens,
            self.layers.len(),
            self.quantized_bits.unwrap_or(0.0),
            self.total_bits
        )
    }
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
    if args.prompt.is_empty() {
        anyhow::bail!("--prompt is empty; give the text to continue, e.g. --prompt \"The capital of France is\"");
    }
    let path = match &args.model {
        Some(p) if !p.exists() => anyhow::bail!("--model {}: no such file or folder", p.display()),
        Some(p) => p.clone(),
        None => {
            let p = crate::paths::default_model();
            if !p.is_file() {
                anyhow::bail!(
                    "the default model {} is missing; data folders searched: {}. Run `cargo xtask fetch`, set \
                     ADAQUANT_DATA, or pass --model FILE.gguf",
                    p.display(),
                    crate::paths::data_search()
                );
            }
            p
        }
    };
    let t0 = std::time::Instant::now();
    let model = Model::load(&path).map_err(|e| anyhow::anyhow!("cannot load the model: {e}"))?;
    let load_s = t0.elapsed().as_secs_f64();
    let text = if args.chat { model.tokenizer().apply_chat_template(&args.prompt)? } else { args.prompt.clone() };
    let prompt = model.tokenizer().encode(&text, false)?;
    if prompt.is_empty() {
        anyhow::bail!("--prompt {:?} gives no tokens; give some text to continue", args.prompt);
    }
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
        "{} tokens in {dt:.2} s ({:.1} tokens/s incl. prefill){}; cache {} holds {} bytes",
        tokens.len(),
        tokens.len() as f64 / dt.max(1e-9),
        if stopped { ", stopped at end of turn" } else { "" },
        cache.describe(),
        mem.total_bytes(),
    );
    let share = QuantizedShare::of(&mem, cache.shape().kv_row());
    let quantizing = !matches!(spec.trim().to_ascii_lowercase().as_str(), "f32" | "fp32" | "full" | "f16" | "fp16");
    if share.is_none() && quantizing {
        let s = spec.trim();
        let hint = if s.starts_with(['k', 'K']) && !s.ends_with(".json") {
            format!("e.g. --cache {s}-r16-s4")
        } else {
            "a smaller \"residual\"".to_string()
        };
        eprintln!("warning: {}. Use a longer prompt or a shorter exact window, {hint}.", share.summary());
    } else {
        eprintln!("{}", share.summary());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `n` tokens of seeded data to every layer of `cache`.
    fn fill(cache: &mut dyn KvCache, n: usize, seed: u64) {
        let shape = cache.shape().clone();
        let mut x = seed;
        let mut next = move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for layer in 0..shape.n_layers {
            let k: Vec<f32> = (0..n * shape.kv_row()).map(|_| next()).collect();
            let v: Vec<f32> = (0..n * shape.kv_row()).map(|_| next()).collect();
            let q: Vec<f32> = (0..n * shape.q_row()).map(|_| next()).collect();
            let mut out = vec![0.0; n * shape.q_row()];
            cache.append_attend(layer, &q, &k, &v, &mut out).unwrap();
        }
    }

    #[test]
    fn an_empty_prompt_names_the_flag_before_anything_loads() {
        let args = GenerateArgs {
            model: Some("/nonexistent/model.gguf".into()),
            prompt: String::new(),
            chat: false,
            max_tokens: 4,
            cache: None,
        };
        let e = run(&args).unwrap_err().to_string();
        assert!(e.starts_with("--prompt is empty"), "{e}");
        let e = run(&GenerateArgs { prompt: "hi".into(), ..args }).unwrap_err().to_string();
        assert_eq!(e, "--model /nonexistent/model.gguf: no such file or folder");
    }

    #[test]
    fn quantized_share_counts_packed_tokens_and_their_bits() {
        let shape = CacheShape::new(3, 4, 2, 64, 256);
        // The case: a 37-token prompt never leaves the default 128-token window.
        let mut c = "k4v2".parse::<CacheSpec>().unwrap().build(shape.clone()).unwrap();
        fill(c.as_mut(), 37, 1);
        let s = QuantizedShare::of(&c.memory(), shape.kv_row());
        assert!(s.is_none() && s.quantized_bits.is_none(), "{s:?}");
        assert!(s.summary().starts_with("nothing was quantized: all 37 tokens"), "{}", s.summary());
        assert!((s.total_bits - 32.0).abs() < 1e-9);
        // A 16-token window: 21 of 37 tokens quantized on both sides, and the packed part costs about 4 and 2 bits
        // plus metadata (two f16 per group of 32) on average: (4 + 2) / 2 + 32 / 32 = 4.
        let mut c = "k4v2-g32-r16".parse::<CacheSpec>().unwrap().build(shape.clone()).unwrap();
        fill(c.as_mut(), 37, 2);
        let s = QuantizedShare::of(&c.memory(), shape.kv_row());
        assert_eq!(s.layers, vec![(21, 21); 3]);
        let bits = s.quantized_bits.unwrap();
        assert!((bits - 4.0).abs() < 1e-9, "{bits}");
        assert!(s.total_bits > bits && s.total_bits < 32.0, "{s:?}");
        assert!(s.summary().contains("quantized 21 of 37 key tokens and 21 of 37 value tokens"), "{}", s.summary());
        // Unquantized keys: only values count.
        let mut c = "k16v2-g32-r0".parse::<CacheSpec>().unwrap().build(shape.clone()).unwrap();
        fill(c.as_mut(), 10, 3);
        let s = QuantizedShare::of(&c.memory(), shape.kv_row());
        assert_eq!(s.layers, vec![(0, 10); 3]);
        // Full-precision caches never count as quantized, f16 included.
        let mut c = CacheSpec::FullF16.build(shape.clone()).unwrap();
        fill(c.as_mut(), 10, 4);
        assert!(QuantizedShare::of(&c.memory(), shape.kv_row()).is_none());
    }
}
