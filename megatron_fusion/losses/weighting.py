"""Multi-teacher weights (docs/methods.md §2 unified fusion): ``L = sum_j w_j * term_j``.

``uniform``: w_j = 1/N. ``minCE``: all weight on the teacher with the lowest CE on the gold
response (per sample when CE is per sample; tied lowest teachers share it equally). ``avgCE``:
softmax(-CE_j) over teachers (FuseLLM). Weights are detached: the CE only chooses, it is not
trained through here.

A CE that is not finite (NaN: the teacher had no response token in that sample; inf) means "not
scored": that teacher gets no weight there. A sample that no teacher scored gets equal weights.
"""

from __future__ import annotations

from typing import Sequence

import torch

WEIGHT_MODES = ("uniform", "minCE", "avgCE")


def combine_teachers(per_teacher_terms: Sequence[torch.Tensor] | torch.Tensor, mode: str = "uniform",
                     teacher_ce: torch.Tensor | Sequence[torch.Tensor] | None = None):
    """Weighted sum of per-teacher loss terms.

    Args:
        per_teacher_terms: N tensors of one shape S (e.g. per-sequence ULD sums ``[b]`` from
            ``uld_loss(..., reduction="sequence")``, or scalars), or one stacked ``[N, *S]``.
        mode: ``"uniform"``, ``"minCE"`` or ``"avgCE"``.
        teacher_ce: ``[N, *S']`` with S' broadcastable to S (e.g. ``[N, b]`` or ``[N]``);
            required for minCE/avgCE.
    Returns:
        ``(combined [*S], weights [N, *S])``; weights sum to 1 over teachers.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"combine_teachers: mode must be one of {WEIGHT_MODES}, got {mode!r}")
    terms = per_teacher_terms if torch.is_tensor(per_teacher_terms) else torch.stack(
        list(per_teacher_terms))
    n = terms.shape[0]
    if mode == "uniform":
        weights = torch.full_like(terms, 1.0 / n)
    else:
        if teacher_ce is None:
            raise ValueError(f"combine_teachers: mode {mode!r} needs teacher_ce")
        ce = (teacher_ce if torch.is_tensor(teacher_ce) else torch.stack(list(teacher_ce)))
        ce = ce.detach().to(terms.dtype)
        if ce.shape[0] != n:
            raise ValueError(f"combine_teachers: {n} teachers' terms but teacher_ce has "
                             f"{ce.shape[0]} rows")
        ce = ce.reshape(ce.shape + (1,) * (terms.dim() - ce.dim())).expand_as(terms)
        scored = torch.isfinite(ce)                                        # [N, *S]
        if mode == "minCE":
            # (not argmin: it picks a NaN, and it breaks ties by teacher order)
            best = torch.where(scored, ce, float("inf")).amin(0, keepdim=True)
            hit = (scored & (ce == best)).to(terms.dtype)
            weights = hit / hit.sum(0, keepdim=True).clamp_min(1)
        else:
            weights = torch.softmax(torch.where(scored, -ce, float("-inf")), dim=0)
        # no teacher scored this sample: equal weights (the softmax above is NaN there)
        weights = torch.where(scored.any(0, keepdim=True), weights, 1.0 / n)
    return (weights * terms).sum(0), weights
