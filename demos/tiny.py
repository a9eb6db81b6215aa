"""The CPU fusion demo (``make demo``): two single-skill teachers -> one fused pivot, at TP=2.

    python -m demos.tiny [--out runs/demo] [--fuse-steps 120] [--teacher-steps 300]
                                   [--tiny] [--online]

1. synthetic tasks with checkable answers (arithmetic word problems, string manipulation) and a
   pivot tokenizer (SentencePiece unigram);
2. two teachers, each trained by this trainer on ONE skill with its OWN tokenizer
   (arithmetic: byte-level BPE; strings: SentencePiece BPE);
3. their standardised top-K precomputed over the pivot's training set
   (tools/precompute_teacher_topk.py, Megatron backend), aligned to pivot positions;
4. the pivot trained with CE + ULD + GLD at TP=2 over gloo (configs/demo/tiny_fuse.yaml);
5. InfiFPO from the fused pivot on preference pairs (correct vs wrong answer), the two teachers
   scoring them as sources with their own tokenizers (configs/demo/tiny_fpo.yaml);
6. a before/after table: held-out CE per domain, held-out preference accuracy, and where the
   metrics and W&B files are.
``--online`` (``make demo-online``): step 3 is skipped and step 4 runs
``megatron-fusion train --config configs/demo/tiny_online.yaml``: the two teachers run as teacher
ranks (2 x TP2) beside the student (TP2), six ranks in all, streaming top-K while it trains.
Re-running reuses finished pieces (data, teachers, top-K shards) and resumes the fused run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_fusion.data.jsonl import read_jsonl, write_jsonl
from megatron_fusion.data.tiny import make_demo_data

from demos.common import eval_table, print_results, run, train



def prepare(out: Path, teacher_steps: int, precompute: bool = True) -> dict:
    """Data, teacher tokenizers, trained teachers, precomputed top-K (each step reused if done;
    no top-K with ``precompute=False``: online teachers compute it during the fusion run)."""
    from megatron_fusion.tokenizers import train_byte_bpe, train_sentencepiece

    data = make_demo_data(out / "data", n_train=2000, n_valid=64)
    recs = [r for _, r in read_jsonl(data["train"])]
    domains = {"arith": [r for r in recs if r["task"] == "arithmetic"],
               "string": [r for r in recs if r["task"] != "arithmetic"]}
    tdir = out / "teachers"
    tdir.mkdir(parents=True, exist_ok=True)
    texts = [r["prompt"] + "\n" + r["response"] for r in recs]
    toks = {"arith": tdir / "arith_tok", "string": tdir / "string.model"}
    if not (toks["arith"] / "tokenizer.json").exists():
        train_byte_bpe(texts, 600, toks["arith"], name="arith-bytebpe")
    if not toks["string"].exists():
        train_sentencepiece(texts, 700, toks["string"], model_type="bpe", name="string-spbpe")
    for name, rows in domains.items():
        path = out / "data" / f"train_{name}.jsonl"
        if not path.exists():
            write_jsonl(path, rows)
        run_dir = tdir / name
        train("configs/demo/tiny_teacher.yaml", 1,
               [f"run.dir={run_dir}", f"data.train={path}", f"data.tokenizer={toks[name]}",
                f"train.steps={teacher_steps}", "logging.progress=true"],
               f"teacher '{name}': {len(rows)} {name} samples, own tokenizer {toks[name].name}")
        if not precompute:
            continue
        run([sys.executable, "tools/precompute_teacher_topk.py", "--backend", "megatron",
              "--checkpoint", str(run_dir), "--teacher-tokenizer", str(toks[name]),
              "--teacher-name", name, "--data", data["train"],
              "--pivot-tokenizer", data["pivot_tokenizer"], "--seq-len", "128",
              "--out", str(out / "topk" / name), "--batch-size", "16"],
             f"teacher '{name}': top-K over the pivot's training set")
    return data


def run_fpo(out: Path, data: dict, fused: Path, steps: int) -> dict:
    """Second part: InfiFPO from the fused pivot against the two teachers as sources."""
    from megatron_fusion.data.synthetic import preference_pairs

    valid_pref = out / "data" / "valid_preference.jsonl"
    if not valid_pref.exists():
        write_jsonl(valid_pref, preference_pairs(64, seed=424242))
    toks = {"arith": out / "teachers" / "arith_tok", "string": out / "teachers" / "string.model"}
    for name, tok in toks.items():
        run([sys.executable, "tools/precompute_source_logprobs.py", "--backend", "megatron",
              "--checkpoint", str(out / "teachers" / name), "--source-tokenizer", str(tok),
              "--source-name", name, "--data", data["preference"], "--seq-len", "128",
              "--out", str(out / "logprobs" / name), "--batch-size", "16", "--no-progress"],
             f"source '{name}': sequence log-probs of chosen and rejected answers", quiet=True)
    fpo_dir = out / "fpo"
    train("configs/demo/tiny_fpo.yaml", 2, [
        f"run.dir={fpo_dir}", f"train.steps={steps}", f"checkpoint.load={fused}",
        f"data.train={data['preference']}", f"data.tokenizer={data['pivot_tokenizer']}",
        f"data.valid=[{data['valid_arith']},{data['valid_string']}]",
        f"fpo.sources_logprobs=[{out}/logprobs/arith,{out}/logprobs/string]",
        f"fpo.source_tokenizers=[{toks['arith']},{toks['string']}]",
        f"fpo.valid_preference={valid_pref}", f"train.eval_interval={max(steps // 3, 1)}"],
        "InfiFPO on preference pairs (fused-source reference, max-margin) at TP=2")
    return eval_table(fpo_dir / "metrics.jsonl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--fuse-steps", type=int, default=120)
    ap.add_argument("--fpo-steps", type=int, default=60)
    ap.add_argument("--tiny", action="store_true", help="a 3-minute version (CI-sized)")
    ap.add_argument("--online", action="store_true",
                    help="fuse with online teacher ranks (configs/demo/tiny_online.yaml)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.teacher_steps, args.fuse_steps, args.fpo_steps = 60, 30, 15
    out = Path(args.out)
    t0 = time.time()
    data = prepare(out, args.teacher_steps, precompute=not args.online)
    fused = out / ("fused_online" if args.online else "fused")
    overrides = [f"run.dir={fused}", f"train.steps={args.fuse_steps}",
                 f"data.train={data['train']}", f"data.tokenizer={data['pivot_tokenizer']}",
                 f"data.valid=[{data['valid_arith']},{data['valid_string']}]",
                 f"fuse.teachers.0.tokenizer={out}/teachers/arith_tok",
                 f"fuse.teachers.1.tokenizer={out}/teachers/string.model",
                 f"train.eval_interval={max(args.fuse_steps // 3, 1)}"]
    if args.online:   # megatron-fusion train starts student + teacher ranks (6) by itself
        run([sys.executable, "-m", "megatron_fusion.cli", "train", "--config",
              "configs/demo/tiny_online.yaml", *overrides,
              f"fuse.teachers.0.checkpoint={out}/teachers/arith",
              f"fuse.teachers.1.checkpoint={out}/teachers/string"],
             "fusing the pivot at TP=2 with two online teacher groups (2 x TP=2), 6 ranks")
    else:
        train("configs/demo/tiny_fuse.yaml", 2, overrides + [
            f"fuse.teachers.0.topk_dir={out}/topk/arith",
            f"fuse.teachers.1.topk_dir={out}/topk/string"],
            "fusing the pivot at TP=2 (CE + ULD + GLD)")
    table = eval_table(fused / "metrics.jsonl")
    fpo_table = run_fpo(out, data, fused, args.fpo_steps)
    print("\n" + "=" * 64)
    print(f"megatron-fusion demo finished in {time.time() - t0:.0f}s")
    print_results(table, fpo_table, fused, out / "fpo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
