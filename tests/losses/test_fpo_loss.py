"""FPO loss (docs/methods.md §5) against a plain per-pair Python reference, its closed forms (one source equal
to the reference model -> length-normalised DPO; both clip boundaries; max-margin selection), and
the multi-teacher weights (docs/methods.md §2: uniform, minCE, avgCE).

    .venv/bin/python -m pytest -q tests/losses/test_fpo_loss.py
"""

from __future__ import annotations

import pytest
import torch

from megatron_fusion.losses import combine_teachers, fpo_loss

F64 = torch.float64


def ref_fpo(pc, pr, rc, rr, sc, sr, beta, delta, fusion):
    out = []
    for i in range(len(pc)):
        cw = [min(max(float(v), float(rc[i]) - delta), float(rc[i]) + delta) for v in sc[i]]
        cl = [min(max(float(v), float(rr[i]) - delta), float(rr[i]) + delta) for v in sr[i]]
        if fusion == "mean":
            fw, fl = sum(cw) / len(cw), sum(cl) / len(cl)
        else:
            margins = [a - b for a, b in zip(cw, cl)]
            j = margins.index(max(margins))
            fw, fl = cw[j], cl[j]
        x = beta * (float(pc[i]) - fw) - beta * (float(pr[i]) - fl)
        out.append(-torch.nn.functional.logsigmoid(torch.tensor(x, dtype=F64)))
    return torch.stack(out)


# ============================================================ FPO
def _fpo_inputs(seed, b=6, n=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64) * 3 - 2   # noqa: E731
    return r(b), r(b), r(b), r(b), r(b, n), r(b, n)


@pytest.mark.parametrize("fusion", ["mean", "max_margin"])
@pytest.mark.parametrize("delta", [0.5, 5.0, 100.0])
def test_fpo_matches_plain_reference(fusion, delta):
    args = _fpo_inputs(10)
    losses, metrics = fpo_loss(*args, beta=2.5, ref_offset=delta, fusion=fusion)
    torch.testing.assert_close(losses, ref_fpo(*args, 2.5, delta, fusion))
    assert 0.0 <= float(metrics["fpo/clip_fraction"]) <= 1.0
    if delta == 100.0:
        assert float(metrics["fpo/clip_fraction"]) == 0.0
    if fusion == "max_margin":
        assert sum(int(metrics[f"fpo/selected/source_{i}"]) for i in range(3)) == 6


def test_fpo_clip_boundaries():
    # source far below / far above the reference: clipped to l_ref -+ delta exactly
    pc, pr = torch.tensor([-1.0], dtype=F64), torch.tensor([-2.0], dtype=F64)
    rc, rr = torch.tensor([-1.5], dtype=F64), torch.tensor([-1.8], dtype=F64)
    lo_hi = torch.tensor([[-100.0, 100.0]], dtype=F64)
    losses, metrics = fpo_loss(pc, pr, rc, rr, lo_hi, lo_hi.flip(-1), beta=1.0, ref_offset=0.5)
    fused_w = ((-1.5 - 0.5) + (-1.5 + 0.5)) / 2
    fused_l = ((-1.8 + 0.5) + (-1.8 - 0.5)) / 2
    want = -torch.nn.functional.logsigmoid(torch.tensor((-1.0 - fused_w) - (-2.0 - fused_l)))
    torch.testing.assert_close(losses[0].float(), want)
    assert float(metrics["fpo/clip_fraction"]) == 1.0
    # exactly on the boundary counts as not clipped and is unchanged
    on = torch.tensor([[-2.0]], dtype=F64)
    _, m2 = fpo_loss(pc, pr, rc, rr, on, torch.tensor([[-1.3]], dtype=F64), ref_offset=0.5)
    assert float(m2["fpo/clip_fraction"]) == 0.0


def test_fpo_with_reference_source_is_length_normalised_dpo():
    pc, pr, rc, rr, _, _ = _fpo_inputs(11)
    beta = 2.5
    dpo = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    for fusion in ("mean", "max_margin"):
        losses, metrics = fpo_loss(pc, pr, rc, rr, rc[:, None], rr[:, None], beta=beta,
                                   fusion=fusion)
        torch.testing.assert_close(losses, dpo)
        torch.testing.assert_close(metrics["rewards/chosen"], (beta * (pc - rc)).mean())
        torch.testing.assert_close(metrics["fpo/accuracy"],
                                   ((pc - rc) > (pr - rr)).to(F64).mean().float())


def test_fpo_max_margin_picks_largest_clipped_margin():
    pc, pr = torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    rc, rr = torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    # source 1 has the largest raw margin, but clipping (delta=1) caps it below source 0
    sc = torch.tensor([[0.9, 50.0], [0.0, 0.5]], dtype=F64)
    sr = torch.tensor([[-0.9, 0.5], [0.0, 0.0]], dtype=F64)
    losses, metrics = fpo_loss(pc, pr, rc, rr, sc, sr, beta=1.0, ref_offset=1.0, fusion="max_margin")
    assert int(metrics["fpo/selected/source_0"]) == 1 and int(metrics["fpo/selected/source_1"]) == 1
    want = -torch.nn.functional.logsigmoid(torch.tensor([-(0.9 + 0.9), -(0.5 - 0.0)], dtype=F64))
    torch.testing.assert_close(losses, want)


# ============================================================ teacher weights
def test_combine_teachers_modes():
    terms = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])     # [N=3, b=2]
    ce = torch.tensor([[2.0, 0.1], [1.0, 3.0], [1.5, 0.2]])
    total, w = combine_teachers(list(terms), "uniform")
    torch.testing.assert_close(total, terms.mean(0))
    total, w = combine_teachers(terms, "minCE", ce)
    torch.testing.assert_close(total, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    total, w = combine_teachers(terms, "avgCE", ce)
    torch.testing.assert_close(w, torch.softmax(-ce, 0))
    torch.testing.assert_close(total, (torch.softmax(-ce, 0) * terms).sum(0))
    total, w = combine_teachers(terms, "avgCE", torch.tensor([1.0, 2.0, 3.0]))   # per teacher
    torch.testing.assert_close(w[:, 0], torch.softmax(-torch.tensor([1.0, 2.0, 3.0]), 0))


def test_fpo_gradcheck_and_errors():
    g = torch.Generator().manual_seed(13)
    pol = torch.randn(4, 2, generator=g, dtype=F64).requires_grad_()
    src = torch.randn(4, 2, 3, generator=g, dtype=F64)
    for fusion in ("mean", "max_margin"):
        assert torch.autograd.gradcheck(
            lambda p: fpo_loss(p[:, 0], p[:, 1], torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64),
                               src[:, 0], src[:, 1], ref_offset=0.8, fusion=fusion)[0], (pol,))
    with pytest.raises(ValueError, match="fusion"):
        fpo_loss(*_fpo_inputs(0), fusion="sum")
    with pytest.raises(ValueError, match="sources"):
        a = _fpo_inputs(0)
        fpo_loss(*a[:4], a[4], a[5][:, :2])


def test_combine_teachers_gradcheck_and_errors():
    g = torch.Generator().manual_seed(14)
    terms = torch.randn(3, 4, generator=g, dtype=F64).requires_grad_()
    ce = torch.randn(3, 4, generator=g, dtype=F64).abs()
    for mode in ("uniform", "minCE", "avgCE"):
        assert torch.autograd.gradcheck(lambda t: combine_teachers(t, mode, ce)[0], (terms,))
    with pytest.raises(ValueError, match="teacher_ce"):
        combine_teachers([torch.ones(2)], "minCE")
    with pytest.raises(ValueError, match="mode"):
        combine_teachers([torch.ones(2)], "maxCE")
    with pytest.raises(ValueError, match="rows"):
        combine_teachers([torch.ones(2)] * 2, "avgCE", torch.ones(3, 2))
