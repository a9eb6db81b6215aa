"""Student step time with online teachers vs the same run on precomputed (offline) top-K.

    python tools/bench_online.py [--steps 20] [--warmup 5] [--teacher-ranks 2 --teacher-tp 2]

Self-contained: demo data, a teacher with its own byte-level BPE tokenizer (a megatron-fusion run
at step 0, the demo teacher's shape), its top-K precomputed for the offline run
(tools/precompute_teacher_topk.py at the teacher's TP), then the student (TP2, fusion stage) for
``--steps`` steps offline and online. Reports the median ``perf/step_s`` of each, their ratio, and
the teacher wait fraction (median ``teacher/wait_s / perf/step_s`` of the online run).
On a small CPU machine the teacher ranks share the cores with the student, so the online step
time there includes that contention; with teachers on their own devices it does not.
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

import yaml

REPO = Path(__file__).resolve().parents[1]
SEQ = 128


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_online: {' '.join(cmd[:6])} ... failed:\n{p.stderr[-3000:]}")


def _torchrun(n: int, args: list[str]) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
          *args])


def prepare(out: Path, tp: int) -> dict:
    from megatron_fusion.data.tiny import make_demo_data
    from megatron_fusion.tokenizers import train_byte_bpe

    data = make_demo_data(out / "data", n_train=400, n_valid=16)
    texts = [json.loads(x)["prompt"] + "\n" + json.loads(x)["response"]
             for x in Path(data["train"]).read_text().splitlines()]
    tok = out / "teacher_tok"
    train_byte_bpe(texts, 600, tok)
    teacher = out / "teacher"
    _torchrun(1, ["-m", "megatron_fusion.train", "--config", "configs/demo/tiny_teacher.yaml",
                  f"run.dir={teacher}", f"data.train={data['train']}", f"data.tokenizer={tok}",
                  "train.steps=0", "logging.progress=false"])
    _torchrun(tp, ["tools/precompute_teacher_topk.py", "--backend", "megatron",
                   "--checkpoint", str(teacher), "--teacher-tokenizer", str(tok),
                   "--teacher-name", "t", "--data", data["train"], "--batch-size", "8",
                   "--pivot-tokenizer", data["pivot_tokenizer"], "--seq-len", str(SEQ),
                   "--out", str(out / "topk"), "--no-progress"])
    return {"data": data, "tok": str(tok), "teacher": str(teacher), "topk": str(out / "topk")}


def student(out: Path, name: str, prep: dict, teacher: dict, steps: int, nproc: int,
            warmup: int, prefetch: int) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "demo/tiny_fuse.yaml").read_text())
    cfg["run"]["dir"] = str(out / name)
    cfg["train"].update(steps=steps, eval_interval=0)
    cfg["data"] = {"train": prep["data"]["train"], "tokenizer": prep["data"]["pivot_tokenizer"],
                   "valid": []}
    cfg["checkpoint"] = {"interval": 0}
    cfg["logging"] = {"interval": 1, "wandb_mode": "disabled", "progress": False}
    cfg["fuse"].update(teachers=[teacher], prefetch=prefetch)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _torchrun(nproc, ["-m", "megatron_fusion.train", "--config", str(path)])
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "perf/step_s" in r][warmup:]
    row = {"run": name, "nproc": nproc, "steps_measured": len(recs),
           "step_s": statistics.median(r["perf/step_s"] for r in recs)}
    if any("teacher/wait_s" in r for r in recs):
        row["wait_s"] = statistics.median(r["teacher/wait_s"] for r in recs)
        row["wait_fraction"] = statistics.median(r["teacher/wait_s"] / r["perf/step_s"]
                                                 for r in recs)
        row["teacher_tokens_per_s"] = statistics.median(r["teacher/t/tokens_per_s"] for r in recs)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--teacher-ranks", type=int, default=2)
    ap.add_argument("--teacher-tp", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        prep = prepare(out, args.teacher_tp)
        base = {"name": "t", "tokenizer": prep["tok"]}
        off = student(out, "offline", prep, dict(base, topk_dir=prep["topk"]), args.steps, 2,
                      args.warmup, args.prefetch)
        on = student(out, "online", prep, dict(base, source="online", backend="megatron",
                                               checkpoint=prep["teacher"],
                                               ranks=args.teacher_ranks, tp=args.teacher_tp),
                     args.steps, 2 + args.teacher_ranks, args.warmup, args.prefetch)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; student TP2 (demo_cpu shape, "
          f"seq {SEQ}, global batch 16), teacher {args.teacher_ranks} ranks TP{args.teacher_tp}, "
          f"prefetch {args.prefetch}")
    print("| run | ranks | step_s (median) | teacher wait_s | wait fraction | teacher tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in (off, on):
        print(f"| {r['run']} | {r['nproc']} | {r['step_s']:.3f} | {r.get('wait_s', 0):.3f} | "
              f"{r.get('wait_fraction', 0):.2f} | {r.get('teacher_tokens_per_s', 0):.0f} |")
    print(f"online / offline step time: {on['step_s'] / off['step_s']:.2f}x")
    print(json.dumps({"offline": off, "online": on}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
