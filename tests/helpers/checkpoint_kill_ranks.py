"""Rank side of tests/trainer/test_checkpoint_kill.py: inspect the run dirs of killed trainers,
resume each to the end, and train the uninterrupted reference (one gloo rank)."""

from __future__ import annotations

from pathlib import Path

from megatron_fusion.config import load_config
from tests.helpers import trainer_ranks as tr


def kill_overrides(data: dict, run_dir: str, steps: int) -> list[str]:
    return tr.tiny_overrides(data, run_dir) + [f"train.steps={steps}", "checkpoint.interval=1",
                                               "checkpoint.keep=2", "model.num_layers=2"]


def resume_killed(rank, world, data, root, killed: list[str], steps: int) -> dict:
    from megatron_fusion.checkpoint import latest_checkpoint
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    def run(run_dir):
        s = train(load_config(None, kill_overrides(data, run_dir, steps)))
        destroy_student_groups()
        return s

    ref = run(f"{root}/ref")
    out = {"ref": tr.plain(ref["checkpoint"]), "killed": {}}
    for run_dir in killed:
        ckpts = Path(run_dir) / "checkpoints"
        latest = latest_checkpoint(ckpts)                      # what a resume will take
        before = sorted(p.name for p in ckpts.iterdir())
        good = tr.plain(str(latest))                             # it loads, every tensor
        s = run(run_dir)
        out["killed"][run_dir] = {
            "latest": latest.name, "before": before, "n_tensors": len(good),
            "start": s["start_step"], "final": tr.plain(s["checkpoint"]),
            "after": sorted(p.name for p in ckpts.iterdir())}
    return out
