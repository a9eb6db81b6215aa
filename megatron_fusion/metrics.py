"""One metrics sink: rank-0 progress bar + summary, ``<run_dir>/metrics.jsonl``, and W&B.

Metric names are slash names (``loss/ce``, ``loss/uld``, ``perf/tokens_per_s``, ``lr``).
Only the rank that owns the sink (global rank 0) writes; the trainer reduces values first.
The W&B run id is kept in ``<run_dir>/wandb_id`` so a resumed/requeued run continues the same
W&B run (env ``WANDB_RUN_ID`` wins when set, e.g. by the Slurm launcher).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path


class MetricsSink:
    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 wandb_mode: str = "offline", wandb_project: str = "megatron-fusion",
                 wandb_entity: str | None = None, run_name: str | None = None,
                 config: dict | None = None, progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self._wandb = None
        self._bar = None
        self._jsonl = None
        self.last: dict = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_mode != "disabled":
            self._wandb = _init_wandb(self.run_dir, wandb_mode, wandb_project, wandb_entity,
                                      run_name or self.run_dir.name, config or {})
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr,
                             mininterval=0.5 if sys.stderr.isatty() else 5.0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        self.last = rec
        self._jsonl.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "step"}, step=step)
        if self._bar is not None:
            self._bar.n = step
            post = {}
            for key in ("loss/total", "loss/ce", "fpo/loss"):
                if key in rec:
                    post[key.split("/")[-1]] = f"{rec[key]:.4f}"
                    break
            if "perf/tokens_per_s" in rec:
                post["tok/s"] = f"{rec['perf/tokens_per_s']:.0f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(0)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.update(0)  # redraws only after mininterval (quiet in CI logs)

    def summary(self, values: dict) -> None:
        if not self.enabled:
            return
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self._wandb, "dir", None) if self._wandb is not None else None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _init_wandb(run_dir: Path, mode: str, project: str, entity: str | None, name: str, config: dict):
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except ImportError:
        print("warning: wandb is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        return None
    id_file = run_dir / "wandb_id"
    run_id = os.environ.get("WANDB_RUN_ID")
    if not run_id:
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    tmp = id_file.with_suffix(".tmp")
    tmp.write_text(run_id)
    os.replace(tmp, id_file)
    return wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow",
                      mode=mode, dir=str(run_dir), config=config,
                      settings=wandb.Settings(console="off", x_disable_stats=True))


class StepTimer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
