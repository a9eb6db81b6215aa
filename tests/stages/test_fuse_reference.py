"""The fuse stage's logged step-1 losses against an independent float64 computation.

The layout tests (test_fuse_stage.py) compare the implementation with itself, so a wrong
normaliser (ULD over N_ce instead of N_uld) would pass them. Here the real trainer runs one fusion
step at TP1 and TP2 (gloo) from a shared TP1 init; ``loss/ce``, ``loss/uld``, ``loss/gld`` and
``loss/total`` from metrics.jsonl must equal a per-position float64 computation from docs/methods.md
§2-§4 (tests/helpers/fuse_reference.py): the same micro-batches (data.order.rank_microbatches with
the run's seed), the teacher top-K read from the shards, the student logits of the initial
weights, every term over its own global count.
"""

from __future__ import annotations

import pytest

from megatron_fusion.local_ranks import run_on_ranks
from megatron_fusion.teachers.shards import TopKReader
from tests.helpers import fuse_reference as fr

pytestmark = [pytest.mark.dist, pytest.mark.slow]
KEYS = ("loss/ce", "loss/uld", "loss/gld", "loss/total")


@pytest.fixture(scope="module")
def runs(demo_data, fuse_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuse_reference"))
    one = run_on_ranks(fr.fuse_step1_ranks, 1, (demo_data, fuse_data, root, [("tp1", [])], True),
                       timeout_s=600)[0]
    two = run_on_ranks(fr.fuse_step1_ranks, 2, (demo_data, fuse_data, root,
                                                [("tp2", ["parallel.tp=2"])], False),
                       timeout_s=600)[0]
    micro, logits = one.pop("micro"), one.pop("logits")
    teachers = []
    for t in fuse_data["teachers"]:
        reader = TopKReader(t["topk_dir"])
        teachers.append([reader.batch(mb["sample_id"].tolist(), one["seq"]) for mb in micro])
    ref = fr.reference_losses(micro, logits, teachers, one["vocab"], k=10, weights=[0.5, 0.5])
    return {**one, **two, "ref": ref}


def test_reference_is_not_degenerate(runs):
    ref = runs["ref"]
    # aligned positions differ from response tokens, so N_uld != N_ce is exercised
    assert all(0 < n < ref["n_ce"] for n in ref["n_uld"]), ref
    assert all(n > 0 for n in ref["n_gld"]) and ref["loss/uld"] > 0.05 and ref["loss/gld"] > 0


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_step1_losses_equal_float64_reference(runs, layout):
    got, ref = runs[layout], runs["ref"]
    for key in KEYS:
        assert abs(got[key] - ref[key]) <= 1e-4 * abs(ref[key]) + 1e-6, \
            f"{layout} {key}: trainer {got[key]!r} vs reference {ref[key]!r}"
