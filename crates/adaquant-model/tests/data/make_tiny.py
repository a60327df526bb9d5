#!/usr/bin/env python3
"""Builds the tiny random checkpoints of `tests/tiny.rs` with Hugging Face transformers' own model classes.

Each folder under `tiny/` gets `config.json`, `weights.json` (the tensors' names and shapes; their values are an
integer hash that `tests/tiny.rs` recomputes, so no weights are committed), a word-level `tokenizer.json` and
`logits.json`: the reference model's float32 logits for every position of `PROMPT` (`PROMPT_LONG` for Gemma).

Pinned environment (CPU is enough; run from this folder):

    python3 -m venv /tmp/venv-ref
    /tmp/venv-ref/bin/pip install torch==2.5.1 transformers==4.53.3 safetensors==0.8.0 numpy==2.4.6
    /tmp/venv-ref/bin/python make_tiny.py
"""

import json
import os

import torch
import transformers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96
PROMPT = [2, 17, 42, 91, 3, 64, 5, 77, 7, 60, 31, 88]
# Gemma's prompt is longer than its 16-token sliding window, so the local layers' window is exercised.
PROMPT_LONG = PROMPT + [(13 * i + 5) % VOCAB for i in range(28)]
HERE = os.path.dirname(os.path.abspath(__file__))

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    initializer_range=0.25,
)


def models():
    yield "llama3", LlamaForCausalLM(
        LlamaConfig(
            **COMMON,
            num_hidden_layers=2,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            # Short wavelengths kept, long ones divided by 8, a ramp between (head_dim 8: wavelengths 6, 167,
            # 4443 and 118000 positions against bands at 64 and 256).
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=256,
            ),
        )
    )
    yield "qwen2", Qwen2ForCausalLM(
        Qwen2Config(**COMMON, num_hidden_layers=2, rope_theta=1000000.0, tie_word_embeddings=True)
    )
    yield "qwen3", Qwen3ForCausalLM(
        Qwen3Config(
            **COMMON, num_hidden_layers=2, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=False
        )
    )
    gemma = dict(COMMON)
    gemma.update(num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6)
    yield "gemma3", Gemma3ForCausalLM(
        Gemma3TextConfig(
            **gemma,
            num_hidden_layers=6,
            head_dim=16,
            # Layers 0-4 slide over 16 tokens with RoPE base 10,000; layer 5 is global with base 1e6 and
            # linear scaling (as in the 4B and larger models); the query scale is 1/sqrt(24), not 1/sqrt(16).
            sliding_window=16,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling=dict(rope_type="linear", factor=2.0),
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            attn_implementation="eager",
        )
    )


MASK = (1 << 64) - 1


def fnv1a(name):
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK
    return h


def splitmix(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def value(name, i, gemma):
    """Element `i` of tensor `name`: an integer hash made exact in float32, so `tests/tiny.rs` rebuilds the same
    weights without any stored file. Norm weights sit near 1 (near 0 for Gemma, whose norms add 1)."""
    u = (splitmix(fnv1a(name) ^ ((i * 0x9E3779B97F4A7C15) & MASK)) % 2001 - 1000) / 1024.0
    if "norm" in name:
        return 0.5 * u if gemma else 1.0 + 0.5 * u
    return 0.25 * u


def fill(model, gemma):
    """Sets every parameter from `value` by its name."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = [value(name, i, gemma) for i in range(p.numel())]
            p.copy_(torch.tensor(flat, dtype=torch.float32).reshape(p.shape))


def tokenizer_json():
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(VOCAB)}, "unk_token": "t0"},
    }


def main():
    torch.manual_seed(0)
    for name, model in models():
        model = model.float().eval()
        fill(model, name == "gemma3")
        out = os.path.join(HERE, "tiny", name)
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        # The weights are not committed: `weights.json` lists the saved tensors, and the test rebuilds their values.
        from safetensors import safe_open

        st = os.path.join(out, "model.safetensors")
        with safe_open(st, "pt") as f:
            listed = [{"name": k, "shape": list(f.get_tensor(k).shape)} for k in sorted(f.keys())]
            for k in f.keys():
                t = f.get_tensor(k).flatten()
                assert all(float(t[i]) == value(k, i, name == "gemma3") for i in range(0, t.numel(), 97)), k
        os.remove(st)
        with open(os.path.join(out, "weights.json"), "w") as f:
            json.dump(listed, f)
        gen = os.path.join(out, "generation_config.json")
        if os.path.exists(gen):
            os.remove(gen)
        with open(os.path.join(out, "tokenizer.json"), "w") as f:
            json.dump(tokenizer_json(), f)
        with torch.no_grad():
            prompt = PROMPT_LONG if name == "gemma3" else PROMPT
            logits = model(torch.tensor([prompt])).logits[0]
        with open(os.path.join(out, "logits.json"), "w") as f:
            json.dump(
                {
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "prompt": prompt,
                    "logits": [[float(x) for x in row] for row in logits],
                },
                f,
            )
        print(name, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()))


if __name__ == "__main__":
    main()
