#!/usr/bin/env python3
"""Reference token ids of Gemma 3 270M's tokenizer on mixed text, for `tests/gemma3.rs`.

The reference is the SentencePiece library itself, running a model rebuilt from the GGUF file's own vocabulary:
the pieces, scores and types that llama.cpp's converter copied from Gemma's tokenizer.model, BPE, byte fallback,
identity normalisation, no dummy prefix, spaces escaped as U+2581. (transformers' GGUF-to-tokenizer converter is
not used: it builds a BPE without merges and splits words such as "SELECT" and "true" into pieces that Gemma's
own tokenizer does not produce.) Writes `gemma3_tokenizer.json`: each line and its ids (without BOS). Same pinned environment as make_tiny.py plus gguf==0.17.1, sentencepiece==0.2.3,
tokenizers==0.21.4 and protobuf==7.36.2.

    /tmp/venv-ref/bin/python make_gemma_tokenizer_ids.py ../../../../data/models/gemma-3-270m-q4_k_m.gguf
"""

import json
import os
import random
import sys

import sentencepiece
from gguf import GGUFReader
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

HERE = os.path.dirname(os.path.abspath(__file__))

WORDS = """the of and to in is was for on that with as by at from his her an were are which this be or has had
not but it its also first one new their after who they two been more other into all time when during only over
some would there about between than most such years three while under these through both later however
Valkyria Chronicles Senjō no tactical role-playing game developed Sega Media.Vision PlayStation Portable
naïve café résumé Zürich Ångström façade jalapeño coöperate São Paulo Kraków Dvořák""".split()

SNIPPETS = [
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}",
    "def f(x):\n\treturn x ** 2  # square",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<div class=\"x\">Hello</div>",
    "SELECT id, name FROM users WHERE age >= 21;",
    "{\"key\": [1, 2.5, -3e10], \"ok\": true}",
    "x = y if y is not None else {}",
    "$ cargo test -p adaquant-model -- --nocapture",
    "https://example.com/path?q=1&r=%20",
    "user@example.org",
]

UNICODE = [
    "日本語のテキストです。",
    "Привет, мир!",
    "مرحبا بالعالم",
    "한국어 문장",
    "emoji 🦀🚀👍🏽 and 🇫🇷",
    "e\u0301 vs é",
    "math: ∑ ∫ √ ≤ ≥ ≠ ∞ π",
    "quotes “like this” and ‘this’ — dash – dash",
    "zero\u200bwidth and nbsp\u00a0here",
    "Ελληνικά κείμενα",
    "हिन्दी पाठ",
    "\u0000\u0007 control",
]

NUMBERS = ["0", "7", "42", "1999", "2024-05-17", "3.14159", "1,234,567", "-0.001", "1e-9", "0x1F", "100%", "$19.99"]


def lines(n=320, seed=13):
    rnd = random.Random(seed)
    out = []
    out += SNIPPETS + UNICODE
    out += [
        "",
        " ",
        "  leading spaces",
        "trailing spaces   ",
        "tabs\tinside\t\tand\t\t\truns",
        "new\nline and\n\n\ndouble",
        "     five spaces then text",
        "\r\nwindows line end",
        " = Valkyria Chronicles III = ",
        " @-@ The game 's @,@ score was 8 @.@ 5 .",
    ]
    while len(out) < n:
        kind = rnd.random()
        k = rnd.randint(3, 18)
        parts = []
        for _ in range(k):
            r = rnd.random()
            if r < 0.7:
                parts.append(rnd.choice(WORDS))
            elif r < 0.85:
                parts.append(rnd.choice(NUMBERS))
            elif r < 0.93:
                parts.append(rnd.choice(UNICODE).split()[0])
            else:
                parts.append(rnd.choice([",", ".", ";", "(", ")", "\"", "'", "!", "?", "-", "--", "..."]))
        sep = rnd.choice([" ", " ", " ", "  ", "\t", "\n", " \n "]) if kind < 0.3 else " "
        line = sep.join(parts)
        if kind > 0.9:
            line = rnd.choice(SNIPPETS) + " " + line
        out.append(line)
    return out


def sentencepiece_from_gguf(path):
    r = GGUFReader(path)
    f = r.fields
    field = lambda k: f[k]
    toks, scores, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type")
    m = sp_pb2.ModelProto()
    for ti, si, yi in zip(toks.data, scores.data, types.data):
        p = m.pieces.add()
        piece = bytes(toks.parts[ti]).decode("utf-8")
        # Runs of spaces are user-defined pieces that Gemma's own tokenizer matches in the raw text (llama.cpp
        # does too); SentencePiece matches user-defined pieces after spaces became U+2581, so write them so.
        if piece and piece.strip(" ") == "":
            piece = "\u2581" * len(piece)
        p.piece = piece
        p.score = float(scores.parts[si][0])
        # GGUF token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte).
        p.type = int(types.parts[yi][0])
    m.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = int(field("tokenizer.ggml.unknown_token_id").contents())
    m.trainer_spec.bos_id = int(field("tokenizer.ggml.bos_token_id").contents())
    m.trainer_spec.eos_id = int(field("tokenizer.ggml.eos_token_id").contents())
    m.trainer_spec.pad_id = int(field("tokenizer.ggml.padding_token_id").contents())
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(field("tokenizer.ggml.add_space_prefix").contents())
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return sentencepiece.SentencePieceProcessor(model_proto=m.SerializeToString())


def main():
    sp = sentencepiece_from_gguf(os.path.abspath(sys.argv[1]))
    data = []
    for line in lines():
        data.append({"text": line, "ids": sp.encode(line)})
    with open(os.path.join(HERE, "gemma3_tokenizer.json"), "w") as f:
        ref = "SentencePiece " + sentencepiece.__version__ + " with a model rebuilt from the GGUF vocabulary"
        json.dump({"reference": ref, "lines": data}, f, ensure_ascii=False)
    print(len(data), "lines,", sum(len(d["ids"]) for d in data), "ids")


if __name__ == "__main__":
    main()
