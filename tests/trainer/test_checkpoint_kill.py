"""A trainer PROCESS SIGKILLed while megatron-core dist_checkpointing saves a checkpoint
(checkpoint.save_checkpoint: a ``iter_N.tmp`` dir, meta.json last, rename, then ``latest``).

Children train with a checkpoint every step and announce each save; the parent kills them at
seeded random delays into the save of a random step. The last good checkpoint must still be the
one ``latest`` names and load; the torn ``.tmp`` is never taken for it; the stale run-dir lock of
the dead process does not block the resume; the resumed run ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_fusion.local_ranks import run_on_ranks
from tests.helpers import checkpoint_kill_ranks as ck
from tests.helpers import kill_children as kc

pytestmark = [pytest.mark.dist, pytest.mark.slow]
STEPS = 5


def test_killed_checkpoint_save_resumes_from_the_last_good_one(demo_data, tmp_path):
    rng = random.Random(2019)
    points = [(str(tmp_path / f"kill{i}"), rng.randint(2, STEPS - 1), rng.uniform(0.0, 0.25))
              for i in range(2)]

    def job(run_dir, step, delay):
        proc = kc.start("train", overrides=ck.kill_overrides(demo_data, run_dir, STEPS))
        kc.kill_after(proc, lambda line: line == f"saving {step}", delay)

    kc.run_concurrently([lambda p=p: job(*p) for p in points])
    res = run_on_ranks(ck.resume_killed, 1, (demo_data, str(tmp_path), [p[0] for p in points],
                                             STEPS), timeout_s=600)[0]
    landed = []
    for run_dir, step, delay in points:
        r = res["killed"][run_dir]
        saved = int(r["latest"][5:])
        # the last save that finished: the announced one's predecessor, or a later one when the
        # kill came after it had finished (a small model saves in well under the delay)
        assert step - 1 <= saved < STEPS, (step, r)
        assert not r["latest"].endswith(".tmp") and r["n_tensors"] > 0
        assert f"iter_{saved:07d}" in r["before"]
        torn = [n for n in r["before"] if n.endswith(".tmp")]
        assert all(n == f"iter_{saved + 1:07d}.tmp" for n in torn), r["before"]  # the torn save
        assert r["start"] == saved                                # resumed from it, not from 0
        assert not any(n.endswith(".tmp") for n in r["after"]), r["after"]
        assert r["final"].keys() == res["ref"].keys()
        for k, v in res["ref"].items():
            assert torch.equal(r["final"][k], v), f"{run_dir}: {k} differs from the uninterrupted run"
        landed.append((step, round(delay, 3), saved, bool(torn)))
    print("kill points (saving step, delay s, latest after kill, torn tmp):", landed)
