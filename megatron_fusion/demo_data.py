"""Demo/test data made on the spot: synthetic SFT tasks and a tiny pivot tokenizer.

    python -m megatron_fusion.demo_data --out runs/demo_data

Writes ``train.jsonl`` (arithmetic + string tasks), held-out ``valid_arith.jsonl`` and
``valid_string.jsonl``, ``preference.jsonl``, and ``pivot.model`` (SentencePiece unigram trained
on the training text). Deterministic for a seed; a finished directory (``DONE`` stamp) is reused.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megatron_fusion.data.jsonl import write_jsonl
from megatron_fusion.data.synthetic import arithmetic_problems, preference_pairs, sft_mix, string_tasks


def make_demo_data(out: str | Path, *, n_train: int = 2000, n_valid: int = 64, seed: int = 0,
                   pivot_vocab: int = 512) -> dict[str, str]:
    out = Path(out)
    stamp = out / "DONE"
    spec = {"n_train": n_train, "n_valid": n_valid, "seed": seed, "pivot_vocab": pivot_vocab}
    paths = {"train": out / "train.jsonl", "valid_arith": out / "valid_arith.jsonl",
             "valid_string": out / "valid_string.jsonl", "preference": out / "preference.jsonl",
             "pivot_tokenizer": out / "pivot.model"}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return {k: str(v) for k, v in paths.items()}
    out.mkdir(parents=True, exist_ok=True)
    train = sft_mix(n_train, seed)
    write_jsonl(paths["train"], train)
    # held-out: other seeds, so no prompt repeats the training set's by construction of the RNG
    write_jsonl(paths["valid_arith"], arithmetic_problems(n_valid, seed + 7919))
    write_jsonl(paths["valid_string"], string_tasks(n_valid, seed + 7919))
    write_jsonl(paths["preference"], preference_pairs(n_train // 4, seed + 104729))
    from megatron_fusion.tokenizers import train_sentencepiece

    texts = [r["prompt"] + "\n" + r["response"] for r in train]
    train_sentencepiece(texts, pivot_vocab, paths["pivot_tokenizer"], model_type="unigram",
                        name="pivot-unigram")
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec))
    os.replace(tmp, stamp)
    return {k: str(v) for k, v in paths.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo_data")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for k, v in make_demo_data(args.out, n_train=args.n_train, seed=args.seed).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
