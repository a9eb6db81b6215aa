"""The fault campaign's --quick run: SIGKILLs of a training run (mid-save, mid-step) with a
corrupted newest checkpoint in between, resumed to the uninterrupted run's bits, and every
malformed record / config / CLI value handled with one line or counted. The full campaign's
figures are in docs/benchmarks.md ("Fault campaign")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]
REPO = Path(__file__).resolve().parents[1]


def test_quick_campaign_survives_everything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.fault_campaign", "--quick", "--workdir",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-2000:]
    m = re.fullmatch(r"fault_campaign: faults injected (\d+) / survived (\d+); "
                     r"inputs tried (\d+) / handled (\d+)", lines[-1])
    assert m, lines[-5:]
    injected, survived, tried, handled = map(int, m.groups())
    assert injected >= 4 and tried >= 50, lines[-1]   # 2 kills, the fallback, the equality
    assert survived == injected and handled == tried and proc.returncode == 0, proc.stdout[-3000:]
    assert "fault  ok   SIGKILL mid-save" in proc.stdout
    assert "resume fell back to the previous one, loudly" in proc.stdout


def test_campaign_fails_on_a_broken_comparison(tmp_path):
    """The bit-for-bit check is not vacuous: one flipped bit in a checkpoint tensor, one
    changed metric value, each is reported."""
    import json

    import torch
    import torch.distributed.checkpoint as dcp

    from tools.fault_campaign import compare_runs

    def run(d: Path, w: torch.Tensor, loss: float) -> Path:
        ck = d / "checkpoints" / "iter_0000002"
        ck.mkdir(parents=True)
        dcp.save({"w": w}, checkpoint_id=str(ck), no_dist=True)
        torch.save({}, ck / "common.pt")
        (ck / "metadata.json").write_text("{}")
        (ck / "meta.json").write_text(json.dumps({"step": 2}))
        (d / "checkpoints" / "latest").write_text(ck.name)
        (d / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "loss/total": 1.0, "perf/step_s": 0.1}) + "\n"
            + json.dumps({"step": 2, "loss/total": loss, "perf/step_s": 0.3}) + "\n")
        return d

    w = torch.randn(64)
    ref = run(tmp_path / "ref", w, 0.5)
    assert compare_runs(ref, run(tmp_path / "same", w.clone(), 0.5)) is None
    flipped = w.clone()
    flipped.view(torch.int32)[7] ^= 1
    assert "w differs" in compare_runs(ref, run(tmp_path / "bit", flipped, 0.5))
    assert "loss/total" in compare_runs(ref, run(tmp_path / "loss", w.clone(), 0.5 + 1e-16 + 1e-12))
