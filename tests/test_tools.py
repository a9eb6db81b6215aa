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
