"""Hybrid cross-tokenizer loss (docs/methods.md §9), vocab-parallel, inside the fused CE + top-K.

Per aligned pivot position the teacher gives its top-K ``(log p_t(i), i)`` over its own
vocabulary and a match map ``j_i`` to pivot ids (-1 = no pivot token with the same surface text,
``megatron_fusion.teachers.vocab_match``). With ``M`` the matched entries and ``U`` the others:

    KL_M   = sum_{i in M} p_t(i) [log p_t(i) - log p_s(j_i)]          log p_s(j) = z_s[j] - lse_s
           = sum_M p_t log p_t - sum_M p_t z_s[j_i] + (sum_M p_t) lse_s
    TAIL   = q_t log(q_t / q_s),  q_t = 1 - sum_M p_t,  q_s = 1 - sum_M p_s(j_i)   (tail_bucket)
    ULD_U  = sum_{r < |U|} | p_s^(r) - p_t^(r) |
             p_t^(r): the r-th largest teacher probability among U;
             p_s^(r): the r-th largest student probability among the pivot ids NOT in {j_i : i in M}
    loss   = w_M (KL_M [+ TAIL]) + w_U ULD_U

The student's |U| largest probabilities outside the matched ids are always inside its global
top-K (k >= K): at most |M| of its top-K are excluded. So every student quantity is one of the
fused Function's outputs: ``lse``, ``matched_z`` = sum_M p_t z_s[j_i] and ``matched_mass`` =
sum_M p_s(j_i) (two more scalars in the one all-reduce), and the raw top-K values. Nothing here
communicates, and autograd routes every gradient back into the Function's ONE shard-sized
gradient.

Weights: fixed ``lambda_matched`` / ``lambda_unmatched``, or ``adaptive`` (GOLD's rule:
w_M = matched teacher vocabulary / teacher vocabulary size, w_U = 1 - w_M).

    from megatron_fusion.losses import hybrid_loss, HybridLossConfig
    s, n = hybrid_loss(logits, t_logprobs, t_pivot_ids, mask, k=10, config=HybridLossConfig(),
                       vocab_size=V, tp_group=groups.tp)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from megatron_fusion.losses._shard import compute_dtype
from megatron_fusion.losses.ce_topk import CETopKMatch, cross_entropy_topk_and_match


@dataclass(frozen=True)
class HybridLossConfig:
    """How the hybrid cross-tokenizer loss weighs its parts (docs/methods.md §9)."""

    lambda_matched: float = 1.0
    """Weight of the matched KL (plus the tail bucket when on); ignored when ``adaptive``."""
    lambda_unmatched: float = 1.0
    """Weight of the ULD over the unmatched remainder; ignored when ``adaptive``."""
    adaptive: bool = False
    """GOLD's rule: w_M = matched teacher tokens / teacher vocab size, w_U = 1 - w_M (needs
    ``matched_fraction`` at the call)."""
    tail_bucket: bool = False
    """Add the mass outside the matched set as one extra KL bucket on both sides."""

    def __post_init__(self):
        for name in ("lambda_matched", "lambda_unmatched"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"HybridLossConfig.{name} must be a number >= 0, got {v!r}")
        for name in ("adaptive", "tail_bucket"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HybridLossConfig.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}")

    def weights(self, matched_fraction: float | None = None) -> tuple[float, float]:
        """(w_M, w_U); ``matched_fraction`` = matched teacher tokens / teacher vocab size."""
        if not self.adaptive:
            return float(self.lambda_matched), float(self.lambda_unmatched)
        if matched_fraction is None or not 0.0 <= matched_fraction <= 1.0:
            raise ValueError("HybridLossConfig.adaptive needs matched_fraction in [0, 1] "
                             f"(VocabMatch.matched_fraction), got {matched_fraction!r}")
        return float(matched_fraction), 1.0 - float(matched_fraction)


def _check_inputs(teacher_logprobs, match_ids, mask, vocab_size, k):
    if teacher_logprobs.dim() != 3 or match_ids.shape != teacher_logprobs.shape:
        raise ValueError(f"hybrid_loss: teacher_logprobs {tuple(teacher_logprobs.shape)} and "
                         f"match_ids {tuple(match_ids.shape)} must both be [b, s, K]")
    if mask.shape != teacher_logprobs.shape[:2]:
        raise ValueError(f"hybrid_loss: mask {tuple(mask.shape)} does not match teacher "
                         f"[b, s] = {tuple(teacher_logprobs.shape[:2])}")
    if k < teacher_logprobs.shape[-1]:
        raise ValueError(f"hybrid_loss: the student top-K k={k} must be >= the teacher's "
                         f"K={teacher_logprobs.shape[-1]}")
    keep = mask > 0
    live = torch.where(keep[..., None], match_ids, -1)
    if live.numel() and (int(live.min()) < -1 or (vocab_size is not None
                                                  and int(live.max()) >= vocab_size)):
        raise ValueError(f"hybrid_loss: match_ids must be -1 or a pivot id in [0, {vocab_size})")
    srt = live.sort(-1).values
    if ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
        raise ValueError("hybrid_loss: two teacher top-K entries of one position map to the "
                         "same pivot id (the match map must be one-to-one)")


def clean_teacher(teacher_logprobs: torch.Tensor, match_ids: torch.Tensor, mask: torch.Tensor):
    """Masked-out positions may hold anything: -> (p_t, log p_t, match ids) with p_t = 0 and
    ids -1 there (so that no garbage reaches the Function's sums)."""
    keep = (mask > 0)[..., None]
    lp = torch.where(keep, teacher_logprobs, -torch.inf)
    return lp.exp(), lp, torch.where(keep, match_ids.long(), -1)


class HybridTerms(NamedTuple):
    """The hybrid loss's parts per aligned position ``[b, s]`` (0 where the mask is 0)."""

    matched: torch.Tensor       # KL_M
    tail: torch.Tensor          # the tail bucket's q_t log(q_t / q_s) (0 without it)
    unmatched: torch.Tensor     # ULD_U over the unmatched remainder
    matched_mass: torch.Tensor  # sum_M p_t: the teacher's top-K probability on matched tokens
    teacher_mass: torch.Tensor  # sum p_t over its whole top-K


def hybrid_terms(out: CETopKMatch, teacher_logprobs: torch.Tensor, match_ids: torch.Tensor,
                 mask: torch.Tensor, *, tail_bucket: bool = False) -> HybridTerms:
    """The unweighted parts of the hybrid loss from the fused Function's outputs (no
    communication); ``out``, ``match_ids`` as :func:`hybrid_from_outputs`."""
    keep = mask > 0
    cdt = out.lse.dtype
    p_t, lp_t, mids = clean_teacher(teacher_logprobs.to(cdt), match_ids, mask)
    matched = mids >= 0                                                 # [b, s, K]
    pm = torch.where(matched, p_t, 0.0)
    p_mass = pm.sum(-1)                                                 # sum_M p_t
    kl = torch.where(matched, p_t * lp_t, 0.0).sum(-1) - out.matched_z + p_mass * out.lse
    tail = torch.zeros_like(kl)
    if tail_bucket:
        q_t = (1.0 - p_mass).clamp_min(0.0)
        q_s = (1.0 - out.matched_mass).clamp_min(torch.finfo(cdt).tiny)
        tail = torch.xlogy(q_t, q_t) - q_t * q_s.log()
    # ULD over the unmatched remainder: teacher's unmatched probabilities (descending) against
    # the student's largest probabilities outside the matched pivot ids (from its top-K)
    kt = p_t.shape[-1]
    n_u = kt - matched.sum(-1, keepdim=True)                            # [b, s, 1]
    t_u = torch.where(matched, 0.0, p_t).sort(-1, descending=True).values
    p_s = (out.raw_values - out.lse[..., None]).exp()                   # [b, s, k], descending
    excluded = (out.ids[..., :, None] == torch.where(matched, mids, -2)[..., None, :]).any(-1)
    order = excluded.to(torch.int8).argsort(dim=-1, stable=True)[..., :kt]  # kept entries first
    s_u = p_s.gather(-1, order)
    rank = torch.arange(kt, device=p_s.device)
    uld = torch.where(rank < n_u, (s_u - t_u).abs(), 0.0).sum(-1)

    def masked(t):
        return torch.where(keep, t, 0.0)
    return HybridTerms(masked(kl), masked(tail), masked(uld), masked(p_mass),
                       masked(p_t.sum(-1)))


def hybrid_from_outputs(out: CETopKMatch, teacher_logprobs: torch.Tensor,
                        match_ids: torch.Tensor, mask: torch.Tensor, *,
                        config: HybridLossConfig = HybridLossConfig(),
                        matched_fraction: float | None = None, reduction: str = "sum"):
    """The hybrid loss from the fused Function's outputs (no communication).

    ``out`` must come from :func:`cross_entropy_topk_and_match` called with the cleaned
    ``match_ids`` and ``match_probs = p_t`` of :func:`clean_teacher` (and the same tail flag).
    Returns ``(loss_sum, count)`` (``reduction="sequence"``: per-sequence ``[b]``).
    """
    if reduction not in ("sum", "sequence"):
        raise ValueError(f"reduction must be 'sum' or 'sequence', got {reduction!r}")
    w_m, w_u = config.weights(matched_fraction)
    keep = mask > 0
    t = hybrid_terms(out, teacher_logprobs, match_ids, mask, tail_bucket=config.tail_bucket)
    per_pos = w_m * (t.matched + t.tail) + w_u * t.unmatched
    if reduction == "sequence":
        return per_pos.sum(-1), keep.sum(-1)
    return per_pos.sum(), keep.sum()


def hybrid_loss(student_logits_local: torch.Tensor, teacher_logprobs: torch.Tensor,
                match_ids: torch.Tensor, mask: torch.Tensor, *, k: int,
                config: HybridLossConfig = HybridLossConfig(),
                matched_fraction: float | None = None, labels: torch.Tensor | None = None,
                eps: float = 1e-6, vocab_size: int | None = None, tp_group=None,
                chunk_tokens: int | None = None, reduction: str = "sum"):
    """Hybrid cross-tokenizer loss on the student's vocab-parallel logits (docs/methods.md §9).

    Args:
        student_logits_local: ``[b, s, v_local]`` this TP rank's shard.
        teacher_logprobs: ``[b, s, K]`` the teacher's top-K log-probs over its full vocabulary
            (``megatron_fusion.teachers.logprobs.recover_logprobs``), aligned to pivot positions.
        match_ids: ``[b, s, K]`` pivot id of each teacher entry, -1 = unmatched.
        mask: ``[b, s]`` 1 = aligned position.
        k: the student's top-K (>= K).
        config, matched_fraction: weights (``matched_fraction`` for ``adaptive``).
        labels: pivot labels when the caller also wants the CE (use
            :func:`cross_entropy_topk_and_match` + :func:`hybrid_from_outputs` directly for that).
        vocab_size, tp_group, eps, chunk_tokens: as :func:`cross_entropy_and_topk`.
    Returns:
        ``(loss_sum, count)``. Communication: one all-gather of k int64 keys, one all-reduce of
        5 (tail: 6) float64 scalars per token; backward none; one shard-sized gradient.
    """
    _check_inputs(teacher_logprobs, match_ids, mask, vocab_size, k)
    tdt = compute_dtype(student_logits_local.dtype)
    p_t, _, mids = clean_teacher(teacher_logprobs.to(tdt), match_ids, mask)
    if labels is None:
        labels = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    out = cross_entropy_topk_and_match(student_logits_local, labels, k, match_ids=mids,
                                       match_probs=p_t, tail_bucket=config.tail_bucket, eps=eps,
                                       vocab_size=vocab_size, tp_group=tp_group,
                                       chunk_tokens=chunk_tokens)
    return hybrid_from_outputs(out, teacher_logprobs, mids, mask, config=config,
                               matched_fraction=matched_fraction, reduction=reduction)
