"""Fusion stage end to end on CPU: CE + ULD + GLD trajectories equal across layouts, gradient
accumulation invariance, resume, and teacher top-K that does not fit the run fails before step 1."""

from __future__ import annotations

import pytest

from megatron_fusion.testing import run_on_ranks
from tests import trainer_ranks as tr

pytestmark = [pytest.mark.dist, pytest.mark.slow]
KEYS = ("loss/total", "loss/ce", "loss/uld", "loss/gld", "loss/uld/tA", "loss/gld/tB")


@pytest.fixture(scope="module")
def traj(demo_data, fuse_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuse_layouts"))
    run_on_ranks(tr.make_init, 1, (demo_data, root, [("init", [])]))
    one = run_on_ranks(tr.fuse_layouts, 1, (demo_data, fuse_data, root, [
        ("tp1", []),
        ("accum4x1", ["train.micro_batch=1"]),       # 4 micro-batches of 1
        ("accum1x4", ["train.micro_batch=4"]),       # 1 micro-batch of 4
    ]), timeout_s=600)[0]
    two = run_on_ranks(tr.fuse_layouts, 2, (demo_data, fuse_data, root, [
        ("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"]), ("dp2", []),
    ]), timeout_s=600)[0]
    four = run_on_ranks(tr.fuse_layouts, 4, (demo_data, fuse_data, root, [
        ("tp2pp2", ["parallel.tp=2", "parallel.pp=2"]),
    ]), timeout_s=600)[0]
    return {**one, **two, **four}


def _series(recs, key):
    return [r[key] for r in recs if key in r and "step" in r and r["step"] > 0][:5]


def _close(name, got, ref, tol=1e-5):
    for key in KEYS:
        a, b = _series(got, key), _series(ref, key)
        assert len(b) == 5 and len(a) == 5, (name, key, a, b)
        for step, (x, y) in enumerate(zip(a, b), 1):
            assert abs(x - y) <= tol * max(abs(y), 1e-8), f"{name} {key} step {step}: {x} vs {y}"


def test_fusion_terms_are_active(traj):
    ref = traj["tp1"]
    assert all(v > 0 for v in _series(ref, "loss/uld")) and all(v > 0 for v in _series(ref, "loss/gld"))
    frac = [r["teacher/tA/aligned_frac"] for r in ref if "teacher/tA/aligned_frac" in r]
    assert frac and 0.3 < frac[0] <= 1.0
    total = _series(ref, "loss/total")[0]
    ce, uld, gld = (_series(ref, k)[0] for k in ("loss/ce", "loss/uld", "loss/gld"))
    assert abs(total - (ce + 1.0 * uld + 0.5 * gld)) <= 1e-6 * total  # default lambdas (1, 1, 0.5)


@pytest.mark.parametrize("name", ["tp2", "pp2", "dp2", "tp2pp2"])
def test_fusion_trajectory_matches_tp1(traj, name):
    _close(name, traj[name], traj["tp1"])


def test_gradient_accumulation_4x1_equals_1x4(traj):
    _close("accum4x1", traj["accum4x1"], traj["accum1x4"])
