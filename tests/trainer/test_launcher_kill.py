"""The real launcher, end to end: `megatron-fusion train` SIGKILLed mid-run leaves no rank alive,
a second launch on a run.dir that a live run holds refuses naming it, and once the holder is gone
a relaunch takes the lock over and resumes (run_guard wired into the trainer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.trainer_ranks import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.dist, pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="PR_SET_PDEATHSIG and /proc are Linux")]


def _launch(overrides: list[str]) -> subprocess.Popen:
    cli = Path(sys.executable).parent / "megatron-fusion"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([str(cli), "train", "--config", "configs/test/tiny_cpu.yaml",
                             "--nproc", "2", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _ranks_of(run_dir: Path) -> list[int]:
    """Pids of processes whose command line names this run dir (ranks, their checkpoint workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if str(run_dir) in cmd and stat.split(")")[-1].split()[0] != "Z":
            out.append(int(d.name))
    return out


def _wait_for(pred, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_killed_launcher_takes_its_ranks_and_a_live_run_holds_its_dir(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    ov = tiny_overrides(demo_data, str(run_dir)) + ["train.steps=100000", "checkpoint.interval=1"]
    a = _launch(ov)
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / "iter_0000002").is_dir(), 240,
                  "run A's step-2 checkpoint")
        assert (run_dir / "run.lock").exists()
        ranks = _ranks_of(run_dir)
        assert len(ranks) >= 2, ranks                      # the launcher and its 2 ranks at least

        # a second launch on the same dir while A is alive: refused, one line naming the holder
        b = _launch(ov)
        _, err = b.communicate(timeout=240)
        assert b.returncode != 0
        holder = json.loads((run_dir / "run.lock").read_text())
        lines = [x for x in err.splitlines() if str(run_dir) in x and "error" in x.lower()]
        assert lines and str(holder["pid"]) in lines[0], err[-2000:]

        # SIGKILL the launcher only (not its process group): its ranks must follow within seconds
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
        _wait_for(lambda: not _ranks_of(run_dir) or None, 20, "the ranks to die with the launcher")
    finally:
        for pid in _ranks_of(run_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # the dead run's lock is stale: a relaunch takes it over and resumes from A's checkpoint
    done = subprocess.run([str(Path(sys.executable).parent / "megatron-fusion"), "train",
                           "--config", "configs/test/tiny_cpu.yaml", "--nproc", "2",
                           *tiny_overrides(demo_data, str(run_dir)), "checkpoint.interval=1",
                           "train.steps=3"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    assert not (run_dir / "run.lock").exists()             # released at the end
