"""The benchmark scripts run (CPU smoke: they must not rot between GPU sessions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_cpu_smoke():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "tools/bench_gpu.py", "--cpu-smoke", "--steps", "2",
                        "--warmup", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fusion / CE step-time ratio" in p.stdout
    ratio = float(p.stdout.split("ratio:")[1].split()[0])
    assert ratio > 0.5


def test_demo_drivers_parse_and_plan():
    """The two demo drivers' arguments and plan (the demos themselves run minutes: make demo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "demos.real", "--dry-run",
                        "--fuse-steps", "3", "--out", "/nonexistent/demo"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fuse: 3 steps" in p.stdout and "/nonexistent/demo" in p.stdout
    assert "SFT-only baseline: the same 3 steps" in p.stdout       # the row beside the fused one
    assert not Path("/nonexistent/demo").exists()
    h = subprocess.run([sys.executable, "-m", "demos.tiny", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "--tiny" in h.stdout


def test_fusion_experiment_arm_syntax():
    """demos/fusion_experiment.py --arms: labels -> trainer overrides (the default arms unchanged)."""
    import demos.fusion_experiment as mod
    assert mod.parse_arms("sft,uld,uld_gld") == {
        "sft": ["stage=sft"], "uld": ["fuse.lambda_gld=0"], "uld_gld": []}
    arms = mod.parse_arms("sft, uld@0.1,uld_gld@0.3/0.1,uld_gld@2")
    assert list(arms) == ["sft", "uld@0.1", "uld_gld@0.3/0.1", "uld_gld@2"]
    assert arms["uld@0.1"] == ["fuse.lambda_uld=0.1", "fuse.lambda_gld=0"]
    assert arms["uld_gld@0.3/0.1"] == ["fuse.lambda_uld=0.3", "fuse.lambda_gld=0.1"]
    assert arms["uld_gld@2"] == ["fuse.lambda_uld=2.0"]
    for bad in ["", "ce", "sft@1", "uld@0.1/0.2", "uld@x", "uld_gld@1/2/3", "sft,sft"]:
        with pytest.raises(ValueError):
            mod.parse_arms(bad)
