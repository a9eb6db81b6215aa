"""Controlled fusion experiment: SFT-only vs ULD vs ULD + GLD, same pivot init, data and tokens.

    python tools/fusion_experiment.py [--out runs/experiment] [--steps 200] [--write docs/experiments.md]

Two single-skill teachers with different tokenizers (arithmetic: byte-level BPE, string tasks:
SentencePiece BPE) are trained and their top-K precomputed exactly as in the demo
(megatron_fusion.demo.prepare). Then the pivot is trained three times from one shared step-0
checkpoint with the same data order and number of steps:
  sft      CE only                     (stage sft)
  uld      CE + ULD                    (stage fuse, lambda_gld = 0)
  uld_gld  CE + ULD + 0.5 GLD          (stage fuse, defaults)
and held-out CE per domain is reported. Numbers are what they are; the table says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_fusion.demo import _train, prepare  # noqa: E402


def final_eval(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if any(k.startswith("eval/") for k in r)]
    return ev[-1] if ev else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--write", default=None, help="append the result table to this markdown file")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = prepare(out, args.teacher_steps)
    common = [f"data.train={data['train']}", f"data.tokenizer={data['pivot_tokenizer']}",
              f"data.valid=[{data['valid_arith']},{data['valid_string']}]",
              f"fuse.teachers.0.tokenizer={out}/teachers/arith_tok",
              f"fuse.teachers.0.topk_dir={out}/topk/arith",
              f"fuse.teachers.1.tokenizer={out}/teachers/string.model",
              f"fuse.teachers.1.topk_dir={out}/topk/string",
              "logging.wandb_mode=disabled", "logging.progress=false", "checkpoint.interval=0",
              f"train.eval_interval={args.steps}", "train.eval_batches=8"]
    _train("configs/demo_cpu.yaml", 2, common + [f"run.dir={out}/init", "train.steps=0", "stage=sft"],
           "shared pivot init (step 0)")
    arms = {"sft": ["stage=sft"], "uld": ["fuse.lambda_gld=0"], "uld_gld": []}
    results = {}
    for arm, extra in arms.items():
        run_dir = out / f"pivot_{arm}"
        _train("configs/demo_cpu.yaml", 2, common + extra + [
            f"run.dir={run_dir}", f"train.steps={args.steps}", f"checkpoint.load={out}/init"],
            f"pivot arm '{arm}' ({args.steps} steps)")
        results[arm] = final_eval(run_dir)
    lines = [f"\n### Run of {datetime.date.today()} ({platform.node()}, {args.steps} pivot steps, "
             f"teachers {args.teacher_steps} steps; `python tools/fusion_experiment.py --steps {args.steps}`)\n",
             "| arm | held-out CE arithmetic | held-out CE string tasks | mean |",
             "|---|---|---|---|"]
    for arm, ev in results.items():
        a, s = ev.get("eval/valid_arith/ce", float("nan")), ev.get("eval/valid_string/ce", float("nan"))
        lines.append(f"| {arm} | {a:.4f} | {s:.4f} | {(a + s) / 2:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.write:
        with open(args.write, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
