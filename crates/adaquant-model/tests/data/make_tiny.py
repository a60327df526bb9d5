#!/usr/bin/env python3
"""Builds the tiny random checkpoints of `tests/tiny.rs` with Hugging Face transformers' own model classes.

Each folder under `tiny/` gets `config.json`, `model.safetensors` (float32), a word-level `tokenizer.json` and
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


def randomize(model, gemma):
    """Norm weights and biases start at constants; make them random so that a wrong convention shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                lo, hi = (-0.5, 0.5) if gemma else (0.5, 1.5)
                p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


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
        randomize(model, name == "gemma3")
        out = os.path.join(HERE, "tiny", name)
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
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
