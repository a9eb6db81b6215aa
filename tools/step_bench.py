"""Student step benchmark through the REAL training loop: CE-only vs CE + ULD + GLD.

Used by ``tools/bench_gpu.py`` and ``tools/gpu_check.sh`` (one H100/H200, BF16, Transformer
Engine when it imports) and smoke-tested on CPU with a tiny model. Each variant is one launch of
the trainer (``torchrun -m megatron_fusion.train``) on the same config and data: ``ce`` runs
``stage=sft``, ``fusion`` runs ``stage=fuse`` against offline teacher top-K shards (synthetic ones
from ``tools/make_synthetic_topk.py`` where no real teacher exists). So every cost of a training
step is in the numbers: batch assembly, ``stage.prepare_step`` (shard reads, the DP count
all-reduce), Megatron's schedule with the stage's ``loss_func``, the report reduction and the
optimizer step. Step time and tokens/s are the trainer's own ``perf/step_s`` and
``perf/tokens_per_s`` from the run's ``metrics.jsonl``, medians over the steps after ``warmup``.

(An earlier version timed a hand-built step in one process with the teacher top-K injected past
``prepare_step``; that never exercised the real path, so it was replaced by this one. The price:
the two variants run one after the other instead of interleaved, so machine drift between the
launches enters the ratio; on a dedicated GPU it is small, on a shared CPU compare several runs.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_fusion.config import Config, ModelConfig, load_config

VARIANTS = {"ce": ["stage=sft"], "fusion": ["stage=fuse"]}
"""Trainer overrides per variant: CE only (the SFT stage) and CE + ULD + GLD (the fuse stage)."""

H100_BF16_PEAK_TFLOPS = 989.0
"""Dense BF16 peak of an H100/H800 SXM (datasheet); the H200 has the same."""
H200_GEMM_TFLOPS = 788.0
"""8192^3 bf16 GEMM through PyTorch measured on this workplace's H200 (device KINDS.md)."""


class BenchError(RuntimeError):
    """A benchmark launch failed: the message names the variant and the trainer's last error."""


def train_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token: 3x the forward of ``megatron_fusion.plan`` (2 per matmul weight,
    output layer included, plus causal attention QK^T and AV at ``m.seq_length``)."""
    from megatron_fusion.plan import forward_flops_per_token

    return 3.0 * forward_flops_per_token(m, m.seq_length)


def _last_error(text: str) -> str:
    """The trainer's own one-line error (``error: ...``), else the last exception line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    mine = [ln for ln in lines if ln.startswith(("error:", "config error:"))]
    if mine:
        return mine[-1]
    exc = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)
           and "ChildFailedError" not in ln]
    return exc[-1] if exc else (lines[-1] if lines else "(no output)")


def run_variant(config: str | None, overrides: list[str], *, variant: str, steps: int,
                warmup: int, run_dir: Path, nproc: int = 1, timeout_s: float | None = None,
                log: Path | None = None) -> dict:
    """One trainer launch of ``variant``; returns medians over steps ``warmup+1..steps`` and the
    per-step records. Raises ``BenchError`` (one line) when the launch fails, or runs past
    ``timeout_s`` before its last step was logged (killed later, in the trainer's end-of-run
    checkpoint, its steps still count: ``killed_after_last_step``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megatron_fusion.train"]
    if config:
        cmd += ["--config", config]
    cmd += [f"run.dir={run_dir}", f"train.steps={steps}", "checkpoint.interval=0",
            "checkpoint.resume=false", "logging.wandb_mode=disabled", "logging.progress=false",
            "logging.interval=1", "train.eval_interval=0", *overrides, *VARIANTS[variant]]
    env = dict(os.environ, PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    # own process group, so a timeout kills torchrun's workers too (they hold the GPU)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if log is not None:
        log.write_text(f"$ {' '.join(cmd)}\n# rc={proc.returncode} wall={wall:.1f}s"
                       f"{' (killed at the timeout)' if timed_out else ''}\n"
                       f"{stdout}\n--- stderr ---\n{stderr}")
    metrics = Path(run_dir) / "metrics.jsonl"
    recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    recs = [r for r in recs if "perf/step_s" in r]
    if timed_out and len(recs) < steps:
        raise BenchError(f"{variant}: the trainer ran past {timeout_s:.0f}s after {len(recs)} of "
                         f"{steps} steps")
    if not timed_out and proc.returncode != 0:
        raise BenchError(f"{variant}: trainer exit {proc.returncode}: "
                         f"{_last_error(stderr + stdout)}")
    if len(recs) <= warmup:
        raise BenchError(f"{variant}: {len(recs)} steps in {metrics}, need more than "
                         f"warmup={warmup}")
    meas = recs[warmup:]
    loss_key = "loss/total" if "loss/total" in recs[0] else "loss/ce"
    return {"variant": variant, "steps": len(recs), "steps_measured": len(meas),
            "step_s": statistics.median(r["perf/step_s"] for r in meas),
            "step_s_min": min(r["perf/step_s"] for r in meas),
            "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in meas),
            "step_s_all": [r["perf/step_s"] for r in recs],
            "losses": [r[loss_key] for r in recs], "loss_key": loss_key,
            "loss_ce": [r.get("loss/ce") for r in recs],
            "loss_uld": [r.get("loss/uld") for r in recs],
            "loss_gld": [r.get("loss/gld") for r in recs], "wall_s": wall,
            # every step ran and was logged, the launch was killed after (in the final save)
            "killed_after_last_step": timed_out}


def bench(config: str | None, overrides: list[str], *, steps: int, warmup: int,
          variants: tuple[str, ...] = ("ce", "fusion"), nproc: int = 1,
          peak_tflops: float = H100_BF16_PEAK_TFLOPS, gemm_tflops: float = H200_GEMM_TFLOPS,
          work_dir: str | Path | None = None, keep_runs: bool = False,
          timeout_s: float | None = None, log_dir: str | Path | None = None) -> dict:
    """Each variant through the real loop, then tokens/s, TFLOP/s and MFU per GPU.

    TFLOP/s = ``train_flops_per_token`` x tokens per step / median step time / GPUs; MFU against
    ``peak_tflops`` and, as a second yardstick, against ``gemm_tflops`` (a measured GEMM rate).
    Run directories (with the end-of-run checkpoint) are deleted unless ``keep_runs``.
    """
    cfg: Config = load_config(config, overrides + VARIANTS["fusion"])
    tokens_per_step = cfg.train.global_batch * cfg.model.seq_length
    fpt = train_flops_per_token(cfg.model)
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="step_bench_")) if own_tmp else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"config": config, "overrides": overrides, "nproc": nproc,
                 "tokens_per_step": tokens_per_step, "flops_per_token": fpt,
                 "flops_per_step": fpt * tokens_per_step, "peak_tflops": peak_tflops,
                 "gemm_tflops": gemm_tflops, "variants": {}}
    try:
        for v in variants:
            run_dir = work / f"run_{v}"
            shutil.rmtree(run_dir, ignore_errors=True)
            log = Path(log_dir) / f"step_bench_{v}.log" if log_dir else None
            r = run_variant(config, overrides, variant=v, steps=steps, warmup=warmup,
                            run_dir=run_dir, nproc=nproc, timeout_s=timeout_s, log=log)
            tflops = fpt * tokens_per_step / r["step_s"] / nproc / 1e12
            r.update(tflops=tflops, mfu=tflops / peak_tflops, vs_gemm=tflops / gemm_tflops)
            out["variants"][v] = r
            if not keep_runs:
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if own_tmp and not keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    vs = out["variants"]
    if "ce" in vs and "fusion" in vs:
        out["ratio"] = vs["fusion"]["step_s"] / vs["ce"]["step_s"]
    return out


def table(res: dict) -> str:
    """A markdown table of ``bench``'s result."""
    names = {"ce": "CE only (stage sft)", "fusion": "CE + ULD + GLD (stage fuse)"}
    lines = ["| variant | step (s) | tokens/s | TFLOP/s | MFU | vs GEMM anchor |",
             "|---|---|---|---|---|---|"]
    for v, r in res["variants"].items():
        lines.append(f"| {names.get(v, v)} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tflops']:.1f} | {r['mfu']:.1%} | {r['vs_gemm']:.1%} |")
    if "ratio" in res:
        lines.append(f"fusion / CE step-time ratio: {res['ratio']:.3f} (medians over the steps "
                     "after warm-up; one launch per variant)")
    return "\n".join(lines)
