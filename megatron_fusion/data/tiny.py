"""Demo/test data made on the spot: synthetic SFT tasks and a tiny pivot tokenizer.

    python -m demos.data --out runs/demo_data

Writes ``train.jsonl`` (arithmetic + string tasks), held-out ``valid_arith.jsonl`` and
``valid_string.jsonl``, ``preference.jsonl``, and ``pivot.model`` (SentencePiece unigram trained
on the training text). Deterministic for a seed; a finished directory (``DONE`` stamp) is reused.
``runs/demo_data`` (the data of ``configs/test/tiny_cpu.yaml``) is also made on first use: the trainer
calls ``ensure_demo_data`` when that recipe's tokenizer is missing.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from megatron_fusion.data.jsonl import write_jsonl
from megatron_fusion.data.synthetic import arithmetic_problems, preference_pairs, sft_mix, string_tasks


# Demo directories the recipes in configs/ read (relative to the repository root, where README's
# commands run) and what makes each: runs/demo_data appears on first use, the others take a demo run.
DEMO_DATA_DIR = Path("runs/demo_data")
DEMO_MAKERS = {DEMO_DATA_DIR: "`python -m demos.data` makes runs/demo_data",
               Path("runs/demo"): "`make demo-tiny` makes runs/demo (data, teachers, top-K, fused pivot)",
               Path("runs/demo_real"): "`make demo` makes runs/demo_real (the real-model demo)"}


def make_demo_data(out: str | Path, *, n_train: int = 2000, n_valid: int = 64, seed: int = 0,
                   pivot_vocab: int = 512, verbose: bool = False) -> dict[str, str]:
    """Write the demo data under ``out`` (reused if already there with the same spec). Safe to
    call from several processes at once (the ranks of one run): one makes it, the others wait."""
    out = Path(out)
    stamp = out / "DONE"
    spec = {"n_train": n_train, "n_valid": n_valid, "seed": seed, "pivot_vocab": pivot_vocab}
    paths = {"train": out / "train.jsonl", "valid_arith": out / "valid_arith.jsonl",
             "valid_string": out / "valid_string.jsonl", "preference": out / "preference.jsonl",
             "pivot_tokenizer": out / "pivot.model"}

    def done() -> bool:
        return (stamp.exists() and json.loads(stamp.read_text()) == spec
                and all(p.exists() for p in paths.values()))

    if done():
        return {k: str(v) for k, v in paths.items()}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, also if we crash
        if not done():
            if verbose:
                print(f"demo data: making {out} (first use; python -m demos.data "
                      f"--out {out})", file=sys.stderr, flush=True)
            stamp.unlink(missing_ok=True)
            _write(paths, n_train, n_valid, seed, pivot_vocab)
            tmp = stamp.with_suffix(".tmp")
            tmp.write_text(json.dumps(spec))
            os.replace(tmp, stamp)
    return {k: str(v) for k, v in paths.items()}


def _write(paths: dict[str, Path], n_train: int, n_valid: int, seed: int, pivot_vocab: int) -> None:
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


def _under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def ensure_demo_data(tokenizer_path: str | Path) -> bool:
    """Make ``runs/demo_data`` (the defaults of ``python -m demos.data``, the same
    bytes) if ``tokenizer_path`` is its missing ``pivot.model``; True if it is there now."""
    path = Path(tokenizer_path)
    if path.name != "pivot.model" or path.parent.resolve() != DEMO_DATA_DIR.resolve():
        return False
    make_demo_data(DEMO_DATA_DIR, verbose=True)
    return path.exists()


def missing_data_hint(path: str | Path) -> str:
    """For a missing file under one of the demo directories: the command that makes it."""
    for root, maker in DEMO_MAKERS.items():
        if _under(Path(path), root):
            return f"; {maker}"
    return ""
