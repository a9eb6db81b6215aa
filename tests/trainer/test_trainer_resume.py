"""Checkpoint/resume: bit-identical continuation on CPU, TP2 -> TP1 resharding, save atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_fusion.local_ranks import run_on_ranks
from tests.helpers import trainer_ranks as tr

pytestmark = [pytest.mark.dist, pytest.mark.slow]
PAD = "model.make_vocab_size_divisible_by=200"


@pytest.fixture(scope="module")
def tp2_resume(demo_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    # vocab 512 padded to a multiple of 200*tp: 800 at TP2 but 600 at TP1, so resuming under TP1
    # must keep the checkpoint's 800 rows (padding never counts in the losses)
    res = run_on_ranks(tr.resume_runs, 2, (demo_data, root, ["parallel.tp=2", PAD]), timeout_s=600)[0]
    return root, res


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_resume_is_bit_identical(tp2_resume):
    root, res = tp2_resume
    assert res["resumed_from"] == 3
    full = {m["step"]: m["loss/ce"] for m in _metrics(f"{root}/full/metrics.jsonl") if "loss/ce" in m}
    split = {m["step"]: m["loss/ce"] for m in _metrics(f"{root}/split/metrics.jsonl") if "loss/ce" in m}
    assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert split[step] == full[step], (step, split[step], full[step])  # bit for bit
    assert res["full_w"].keys() == res["split_w"].keys()
    for k in res["full_w"]:
        assert torch.equal(res["full_w"][k], res["split_w"][k]), k
    # the optimizer state went through the checkpoint too (Adam moments are saved tensors)
    assert any(k.startswith("optimizer") for k in res["full_w"])


def test_tp2_checkpoint_resumes_under_tp1(tp2_resume, demo_data):
    """A TP2 run directory continues under TP1: weights+Adam resharded, the padded vocab of the
    checkpoint kept, same next loss."""
    root, _ = tp2_resume
    import shutil

    src = Path(root) / "split"
    dst = Path(root) / "split_tp1"
    shutil.copytree(src, dst)
    # roll the copy back to step 3 so step 4 can be compared with the uninterrupted TP2 run
    assert (dst / "checkpoints" / "iter_0000003" / "meta.json").exists()  # keep=2: steps 3 and 6
    (dst / "checkpoints" / "latest").write_text("iter_0000003")
    latest = (dst / "checkpoints" / "latest").read_text().strip()
    out = run_on_ranks(tr.continue_run, 1, (demo_data, str(dst), [PAD], int(latest[-7:]) + 1))[0]
    full = {m["step"]: m["loss/ce"] for m in _metrics(f"{root}/full/metrics.jsonl") if "loss/ce" in m}
    assert out["start"] == int(latest[-7:])
    assert abs(out["loss"] - full[out["start"] + 1]) <= 1e-5 * abs(full[out["start"] + 1])


def test_interrupted_save_keeps_last_good(tp2_resume):
    """A save that died mid-way leaves only an *.tmp dir, which is never read."""
    from megatron_fusion.checkpoint import latest_checkpoint

    root, _ = tp2_resume
    ck = Path(root) / "full" / "checkpoints"
    good = latest_checkpoint(ck)
    (ck / "iter_0000099.tmp").mkdir()
    (ck / "iter_0000099.tmp" / "garbage").write_text("half-written")
    assert latest_checkpoint(ck) == good


def test_step0_checkpoint_resumes(demo_data, tmp_path):
    """A run dir holding only a step-0 checkpoint (no optimizer moments yet) resumes, and gives
    the same weights as a fresh run of the same steps."""
    import torch

    from megatron_fusion.local_ranks import run_on_ranks
    from tests.helpers.trainer_ranks import resume_from_step0

    r = run_on_ranks(resume_from_step0, 1, (demo_data, str(tmp_path)))[0]
    assert r["start"] == 0
    assert r["losses"][0]["loss/ce"] == r["losses"][1]["loss/ce"]
    a, b = r["w"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
