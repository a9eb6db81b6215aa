"""What the demo drivers share: run a step as a subprocess, train through torchrun, read results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict:
    """The demos' child environment: one thread per rank, no warnings, no tokenizer threads."""
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", **extra)


def run(cmd: list[str], what: str, quiet: bool = False, env_vars: dict | None = None) -> None:
    """One demo step from the repository root; a failure stops the demo naming the step."""
    print(f"\n==> {what}\n    {' '.join(cmd)}", flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, env=env_vars or env(), cwd=ROOT,
                       stdout=subprocess.DEVNULL if quiet else None)
    if p.returncode != 0:
        raise SystemExit(f"demo: step failed ({what}), exit code {p.returncode}")
    print(f"    ({time.time() - t0:.0f}s)", flush=True)


def train(config: str, nproc: int, overrides: list[str], what: str) -> None:
    """``megatron_fusion.train`` on ``nproc`` local ranks (torchrun, standalone)."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "megatron_fusion.train", "--config", config, *overrides], what)


def eval_table(metrics_file: Path) -> dict:
    recs = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    evals = [r for r in recs if any(k.startswith("eval/") for k in r)]
    return {"before": evals[0], "after": evals[-1]} if evals else {}


def print_results(table: dict, fpo_table: dict, fused: Path, fpo: Path,
                  sft_table: dict | None = None) -> None:
    """The demos' closing table: held-out CE per domain, preference accuracy, where things are.

    ``sft_table`` (the real demo): the same run with CE only (same init, data and steps), printed
    beside the fused one, so the teacher's share of "CE after" is visible."""
    nan = float("nan")
    head = f"{'held-out domain':20s} {'CE before':>10s} {'CE after':>10s} {'ppl after':>10s}"
    if sft_table is not None:
        head += f" {'SFT-only':>10s} {'fused-SFT':>10s}"
    print(head + ("   (CE after = fused; SFT-only: CE alone, same init/data/steps)"
                  if sft_table is not None else ""))
    for dom in ("valid_arith", "valid_string"):
        b = table.get("before", {}).get(f"eval/{dom}/ce", nan)
        a = table.get("after", {}).get(f"eval/{dom}/ce", nan)
        p = table.get("after", {}).get(f"eval/{dom}/ppl", nan)
        row = f"{dom:20s} {b:10.3f} {a:10.3f} {p:10.2f}"
        if sft_table is not None:
            s = sft_table.get("after", {}).get(f"eval/{dom}/ce", nan)
            row += f" {s:10.3f} {a - s:+10.3f}"
        print(row)
    b = fpo_table.get("before", {}).get("eval/pref_accuracy", nan)
    a = fpo_table.get("after", {}).get("eval/pref_accuracy", nan)
    print(f"{'held-out pairs':20s} {'acc before':>10s} {'acc after':>10s}   (FPO, correct > wrong answer)")
    print(f"{'valid_preference':20s} {b:10.3f} {a:10.3f}")
    print(f"metrics:     {fused / 'metrics.jsonl'}  and  {fpo / 'metrics.jsonl'}")
    print(f"checkpoints: {fused / 'checkpoints'}  and  {fpo / 'checkpoints'}")
    print(f"W&B (offline): {fused / 'wandb'}  (wandb sync {fused / 'wandb'}/offline-run-* to upload)")
