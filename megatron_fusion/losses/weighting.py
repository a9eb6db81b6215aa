"""Multi-teacher weights (SPEC §2 unified fusion): ``L = sum_j w_j * term_j``.

``uniform``: w_j = 1/N. ``minCE``: one-hot on the teacher with the lowest CE on the gold response
(per sample when CE is per sample; ties to the lower index). ``avgCE``: softmax(-CE_j) over
teachers (FuseLLM). Weights are detached: the CE only chooses, it is not trained through here.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

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
        if mode == "minCE":
            weights = F.one_hot(ce.argmin(0), n).movedim(-1, 0).to(terms.dtype)
        else:
            weights = torch.softmax(-ce, dim=0)
    return (weights * terms).sum(0), weights
