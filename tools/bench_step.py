"""Step time and tokens/s of the trainer for a config (and layout), measured in one launch.

    python tools/bench_step.py --config configs/test/tiny_cpu.yaml --nproc 2 --steps 30 [overrides]
    python tools/bench_step.py --packing --ratio 4 --steps 20 [overrides]   # packed vs unpacked

Starts torchrun, trains ``--steps`` steps (checkpoints off, W&B off) and reads the run's
metrics.jsonl: median step time, tokens/s (sequence slots) and real tokens/s (slots holding a
sample) over the steps after ``--warmup``.

``--packing`` writes an instruction-like SFT set (log-normal sample lengths, mean
``seq_length / ratio`` pivot tokens, prompt about a third of a sample) and trains it twice in one
run, ``data.packing=none`` then ``greedy``, same config and samples (docs/methods.md §10).
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
    real_s = statistics.median(r["perf/real_tokens_per_s"] for r in recs)
    eff = statistics.mean(r["data/packing_efficiency"] for r in recs)
    return {"config": config, "nproc": nproc, "overrides": overrides, "steps_measured": len(recs),
            "step_s": step_s, "steps_per_s": 1.0 / step_s, "tokens_per_s": tok_s,
            "real_tokens_per_s": real_s, "packing_efficiency": eff}


_WORDS = ("the model reads a short question and writes a careful answer with a few steps of "
          "reasoning about numbers lists names places colours animals and simple facts").split()


def instruction_like_jsonl(path: Path, tokenizer, n: int, mean_tokens: float, seq_length: int,
                           seed: int = 0) -> list[int]:
    """``n`` prompt/response records whose pivot-token lengths are log-normal (sigma 0.7) with
    mean ``mean_tokens``, cut to ``seq_length``; returns the lengths aimed at."""
    import math
    import random

    rng = random.Random(seed)
    probe = " ".join(rng.choice(_WORDS) for _ in range(400))
    tokens_per_word = len(tokenizer.encode_with_offsets(probe)[0]) / 400
    sigma = 0.7
    mu = math.log(mean_tokens) - sigma ** 2 / 2              # E[lognormal] = mean_tokens
    lengths, lines = [], []
    for _ in range(n):
        total = int(min(max(rng.lognormvariate(mu, sigma), 8), seq_length))
        lengths.append(total)
        words = max(int(total / tokens_per_word) - 2, 3)      # BOS + EOS
        k = max(words // 3, 1)
        text = [rng.choice(_WORDS) for _ in range(words)]
        lines.append(json.dumps({"prompt": " ".join(text[:k]), "response": " ".join(text[k:])}))
    path.write_text("\n".join(lines) + "\n")
    return lengths


def bench_packing(config: str, nproc: int, steps: int, warmup: int, ratio: float,
                  overrides: list[str]) -> dict:
    """Packed vs unpacked real tokens/s on an instruction-like set (one run, same samples)."""
    from megatron_fusion.config import load_config
    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.data.tiny import ensure_demo_data
    from megatron_fusion.tokenizers import load_tokenizer

    cfg = load_config(config, overrides)
    ensure_demo_data(cfg.data.tokenizer)
    tok = load_tokenizer(cfg.data.tokenizer)
    s = cfg.model.seq_length
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "instruct.jsonl"
        aim = s / ratio
        for _ in range(3):   # words -> tokens is approximate: rescale the aim to the measured mean
            instruction_like_jsonl(data, tok, 2000, aim, s)
            ds = SFTDataset(data, tok, s)
            mean = statistics.mean(ds[i]["length"] for i in range(len(ds)))
            aim *= (s / ratio) / mean
        common = overrides + [f"data.train={data}"]
        rows = [bench(config, nproc, steps, warmup, common + [f"data.packing={p}"])
                for p in ("none", "greedy")]
    return {"seq_length": s, "mean_slots": mean, "ratio": s / mean, "rows": rows,
            "speedup": rows[1]["real_tokens_per_s"] / rows[0]["real_tokens_per_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/test/tiny_cpu.yaml")
    ap.add_argument("--nproc", type=int, default=None, help="default: tp*pp of the config")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layouts", default=None,
                    help="comma list of tp:nproc to compare in one run, e.g. '1:1,2:2'")
    ap.add_argument("--packing", action="store_true",
                    help="packed vs unpacked real tokens/s on an instruction-like length mix")
    ap.add_argument("--ratio", type=float, default=4.0,
                    help="--packing: model.seq_length / mean sample length")
    args, overrides = ap.parse_known_args(argv)
    from megatron_fusion.config import load_config

    cfg = load_config(args.config, overrides)
    if args.packing:
        n = args.nproc or cfg.parallel.tp * cfg.parallel.pp
        res = bench_packing(args.config, n, args.steps, args.warmup, args.ratio, overrides)
        print(f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}; "
              f"seq_length {res['seq_length']}, mean sample {res['mean_slots']:.1f} slots "
              f"(ratio {res['ratio']:.2f})")
        print("| data.packing | ranks | step (s) | tokens/s (slots) | real tokens/s | efficiency |")
        print("|---|---|---|---|---|---|")
        for r, p in zip(res["rows"], ("none", "greedy")):
            print(f"| {p} | {r['nproc']} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                  f"{r['real_tokens_per_s']:.0f} | {r['packing_efficiency']:.3f} |")
        print(f"real tokens/s, packed / unpacked: {res['speedup']:.2f}x")
        return 0
    rows = []
    if args.layouts:
        for item in args.layouts.split(","):
            tp, n = item.split(":")
            rows.append(bench(args.config, int(n), args.steps, args.warmup,
                              overrides + [f"parallel.tp={tp}"]))
    else:
        n = args.nproc or cfg.parallel.tp * cfg.parallel.pp
        rows.append(bench(args.config, n, args.steps, args.warmup, overrides))
    print(f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}")
    print("| layout | ranks | step (s) | steps/s | tokens/s | real tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lay = " ".join(o for o in r["overrides"] if o.startswith("parallel")) or "config"
        print(f"| {lay} | {r['nproc']} | {r['step_s']:.4f} | {r['steps_per_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['real_tokens_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
