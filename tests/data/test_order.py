"""The one step slicing (data.order.step_microbatch_indices) that the student's loop and the
online teachers' loop share, against an independent computation of the same split."""

from __future__ import annotations

import pytest

from megatron_fusion.data.order import SampleOrder, step_microbatch_indices
from megatron_fusion.errors import DataError


def _reference(perms: list[list[int]], n: int, consumed: int, gb: int, mb: int, dp: int, r: int):
    """Global sample g of the run is perms[g // n][g % n]; rank r takes its contiguous gb/dp."""
    per = gb // dp
    glob = [consumed + r * per + i for i in range(per)]
    idx = [perms[g // n][g % n] for g in glob]
    return [idx[j:j + mb] for j in range(0, per, mb)]


@pytest.mark.parametrize("gb,mb,dp", [(12, 2, 3), (8, 4, 1), (8, 1, 4), (6, 3, 2)])
def test_step_slicing_matches_an_independent_split_across_epochs(gb, mb, dp):
    n, seed = 10, 7
    order = SampleOrder(n, seed)
    perms = [[order.indices(e * n + i, 1)[0] for i in range(n)] for e in range(6)]
    for e in range(6):   # each epoch's order is a permutation of the dataset, and epochs differ
        assert sorted(perms[e]) == list(range(n))
    assert perms[0] != perms[1]
    for consumed in (0, gb, 3 * gb, 17):              # 17: a position that straddles an epoch
        got = [step_microbatch_indices(order, consumed, gb, mb, dp, r) for r in range(dp)]
        for r in range(dp):
            assert got[r] == _reference(perms, n, consumed, gb, mb, dp, r)
            assert all(len(m) == mb for m in got[r]) and len(got[r]) == gb // dp // mb
        # the ranks together cover the step's gb samples exactly once, in global order
        flat = [i for r in range(dp) for m in got[r] for i in m]
        assert flat == order.indices(consumed, gb)


def test_order_is_deterministic_and_rejects_an_empty_set():
    a, b = SampleOrder(50, 3), SampleOrder(50, 3)
    assert a.indices(40, 30) == b.indices(40, 30)
    assert SampleOrder(50, 4).indices(0, 50) != a.indices(0, 50)
    with pytest.raises(DataError, match="training set is empty"):
        SampleOrder(0, 1)
