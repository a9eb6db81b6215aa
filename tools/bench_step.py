"""Step time and tokens/s of the trainer for a config (and layout), measured in one launch.

    python tools/bench_step.py --config configs/test/tiny_cpu.yaml --nproc 2 --steps 30 [overrides]

Starts torchrun, trains ``--steps`` steps (checkpoints off, W&B off) and reads the run's
metrics.jsonl: median step time and tokens/s over the steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(config: str, nproc: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "megatron_fusion.train", "--config", config,
               f"run.dir={run_dir}", f"train.steps={steps}", "checkpoint.interval=0",
               "logging.wandb_mode=disabled", "logging.progress=false", "logging.interval=1",
               "data.valid=[]", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"bench_step: training failed:\n{p.stderr[-3000:]}")
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "perf/step_s" in r][warmup:]
    step_s = statistics.median(r["perf/step_s"] for r in recs)
    tok_s = statistics.median(r["perf/tokens_per_s"] for r in recs)
    return {"config": config, "nproc": nproc, "overrides": overrides, "steps_measured": len(recs),
            "step_s": step_s, "steps_per_s": 1.0 / step_s, "tokens_per_s": tok_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/test/tiny_cpu.yaml")
    ap.add_argument("--nproc", type=int, default=None, help="default: tp*pp of the config")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layouts", default=None,
                    help="comma list of tp:nproc to compare in one run, e.g. '1:1,2:2'")
    args, overrides = ap.parse_known_args(argv)
    rows = []
    if args.layouts:
        for item in args.layouts.split(","):
            tp, n = item.split(":")
            rows.append(bench(args.config, int(n), args.steps, args.warmup,
                              overrides + [f"parallel.tp={tp}"]))
    else:
        from megatron_fusion.config import load_config

        cfg = load_config(args.config, overrides)
        n = args.nproc or cfg.parallel.tp * cfg.parallel.pp
        rows.append(bench(args.config, n, args.steps, args.warmup, overrides))
    print(f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}")
    print("| layout | ranks | step (s) | steps/s | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        lay = " ".join(o for o in r["overrides"] if o.startswith("parallel")) or "config"
        print(f"| {lay} | {r['nproc']} | {r['step_s']:.4f} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
