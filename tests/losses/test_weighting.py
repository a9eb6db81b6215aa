"""Multi-teacher weights against hand-computed numbers: ``combine_teachers`` (uniform, minCE,
avgCE, ties, per-teacher CE, NaN/inf) and the fuse stage's per-sample weights
(``FuseStage._weights``: static weights for uniform; a teacher with no response token -- CE NaN --
gets no weight; a sample no teacher scored falls back to equal weights).

    .venv/bin/python -m pytest -q tests/losses/test_weighting.py
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_fusion.config import config_from_dict
from megatron_fusion.losses import combine_teachers

NAN, INF = float("nan"), float("inf")
LN2, LN4 = math.log(2.0), math.log(4.0)


def _w(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ============================================================ combine_teachers
def test_uniform_is_one_over_n():
    terms = _w([[3.0, 6.0], [6.0, 3.0], [9.0, 0.0]])              # [N=3, b=2]
    total, w = combine_teachers(list(terms), "uniform")
    assert torch.equal(w, torch.full((3, 2), 1 / 3))
    torch.testing.assert_close(total, _w([6.0, 3.0]))


def test_min_ce_picks_the_lowest_per_sample():
    terms = _w([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    ce = _w([[2.0, 0.1], [1.0, 3.0], [1.5, 0.2]])                  # sample 0: teacher 1; 1: teacher 0
    total, w = combine_teachers(terms, "minCE", ce)
    assert torch.equal(w, _w([[0, 1], [1, 0], [0, 0]]))
    assert torch.equal(total, _w([30.0, 20.0]))


def test_min_ce_ties_share_the_weight():
    ce = _w([[1.0, 5.0], [1.0, 5.0], [2.0, 5.0]])                  # sample 0: 0 and 1 tie; 1: all tie
    _, w = combine_teachers(torch.zeros(3, 2), "minCE", ce)
    torch.testing.assert_close(w, _w([[0.5, 1 / 3], [0.5, 1 / 3], [0.0, 1 / 3]]))


def test_avg_ce_is_softmax_of_minus_ce_by_hand():
    # CE 0, ln 2, ln 4 -> exp(-CE) = 1, 1/2, 1/4 -> weights 4/7, 2/7, 1/7
    terms = _w([[7.0], [14.0], [21.0]])
    total, w = combine_teachers(terms, "avgCE", _w([[0.0], [LN2], [LN4]]))
    torch.testing.assert_close(w, _w([[4 / 7], [2 / 7], [1 / 7]]))
    torch.testing.assert_close(total, _w([4.0 + 4.0 + 3.0]))
    # one CE per teacher [N] broadcasts over the samples
    _, w = combine_teachers(torch.zeros(3, 2), "avgCE", _w([0.0, LN2, LN4]))
    torch.testing.assert_close(w, _w([[4 / 7] * 2, [2 / 7] * 2, [1 / 7] * 2]))


@pytest.mark.parametrize("mode", ["minCE", "avgCE"])
def test_unscored_teacher_gets_no_weight_and_unscored_sample_equal_weights(mode):
    # sample 0: teacher 1 unscored (NaN); sample 1: teacher 0 inf; sample 2: nobody scored
    ce = _w([[0.0, INF, NAN], [NAN, LN2, NAN], [LN2, LN2, INF]])
    terms = _w([[3.0, 3.0, 3.0], [6.0, 6.0, 6.0], [9.0, 9.0, 9.0]])
    total, w = combine_teachers(terms, mode, ce)
    want = {"minCE": [[1, 0, 1 / 3], [0, 0.5, 1 / 3], [0, 0.5, 1 / 3]],
            "avgCE": [[2 / 3, 0, 1 / 3], [0, 0.5, 1 / 3], [1 / 3, 0.5, 1 / 3]]}[mode]
    torch.testing.assert_close(w, _w(want))
    assert torch.isfinite(total).all()
    torch.testing.assert_close(total, (_w(want) * terms).sum(0))


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        combine_teachers(torch.zeros(2, 1), "maxCE")
    with pytest.raises(ValueError, match="needs teacher_ce"):
        combine_teachers(torch.zeros(2, 1), "avgCE")
    with pytest.raises(ValueError, match="3 rows"):
        combine_teachers(torch.zeros(2, 1), "minCE", torch.zeros(3, 1))


# ============================================================ FuseStage._weights
def _stage(weighting: str, static=(1.0, 1.0, 1.0)):
    """A FuseStage over three stand-in teachers (no shards, no process group: ``_weights`` reads
    only the config and the batch's per-teacher CE)."""
    from megatron_fusion.stages.fuse import FuseStage

    cfg = config_from_dict({"stage": "fuse", "fuse": {
        "weighting": weighting,
        "teachers": [{"name": f"t{i}", "source": "offline", "topk_dir": f"/nowhere/t{i}",
                      "weight": w} for i, w in enumerate(static)]}})
    stand_ins = [SimpleNamespace(name=f"t{i}") for i in range(3)]
    return FuseStage(cfg, 32, SimpleNamespace(tp=None, device=torch.device("cpu")), teachers=stand_ins)


def _batch(ce_rows):
    ce = _w(ce_rows)                                                # [N, b]
    # a micro-batch as the data path makes it: b samples (sample_id; packed rows may hold several)
    return {"tokens": torch.zeros(ce.shape[1], 4, dtype=torch.long),
            "sample_id": torch.arange(ce.shape[1]), "teachers": [{"ce": row} for row in ce]}


def test_fuse_stage_uniform_uses_the_static_weights():
    w = _stage("uniform", static=(1.0, 3.0, 4.0))._weights(_batch([[NAN, 1.0]] * 3))
    torch.testing.assert_close(w, _w([[0.125] * 2, [0.375] * 2, [0.5] * 2]))


@pytest.mark.parametrize("mode", ["minCE", "avgCE"])
def test_fuse_stage_weights_by_hand_with_nan_fallback(mode):
    # rows: teachers, columns: samples. Sample 0: CE 0, ln 2, ln 4; sample 1: teacher 0 had no
    # response token (NaN), then ln 2, 0; sample 2: no teacher scored
    batch = _batch([[0.0, NAN, NAN], [LN2, LN2, NAN], [LN4, 0.0, NAN]])
    w = _stage(mode)._weights(batch)
    want = {"minCE": [[1, 0, 1 / 3], [0, 0, 1 / 3], [0, 1, 1 / 3]],
            "avgCE": [[4 / 7, 0, 1 / 3], [2 / 7, 1 / 3, 1 / 3], [1 / 7, 2 / 3, 1 / 3]]}[mode]
    assert w.shape == (3, 3)
    torch.testing.assert_close(w, _w(want))
    torch.testing.assert_close(w.sum(0), torch.ones(3))
