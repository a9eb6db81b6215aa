"""ULD loss with top-K and z-score (InfiFusion; methods.md §2), vocab-parallel.

Per aligned position: ``a = topK(zscore(z))``, ``p = softmax(a / T)``,
``ULD = sum_i |p_s[i] - p_t[i]|`` between the student's and the teacher's *sorted* top-K
probabilities (no vocabulary mapping, so teachers may have any tokenizer).
"""

from __future__ import annotations

import torch

from megatron_fusion.losses.topk import distributed_topk, standardized_topk

ZSCORE_MODES = ("full", "topk")


def check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "sequence"):
        raise ValueError(f"reduction must be 'sum' or 'sequence', got {reduction!r}")


def zscore_within_topk(values: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., k] -> the K values standardised among themselves (population std)."""
    mu = values.mean(-1, keepdim=True)
    var = (values - mu).pow(2).mean(-1, keepdim=True)
    # all K values equal (exact ties): sigma = 0 has no derivative; take 0 instead of sqrt's inf*0
    positive = var > 0
    sigma = torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)
    return (values - mu) / (sigma + eps)


def uld_from_topk(student_values: torch.Tensor, teacher_values: torch.Tensor, *,
                  temperature: float = 1.0, eps: float = 1e-6, zscore: str = "full") -> torch.Tensor:
    """Per-position ULD from the two sorted top-K value lists ``[..., k]`` -> ``[...]``.

    ``zscore="full"``: the values are already full-vocab standardised (``a`` of methods.md §2).
    ``zscore="topk"``: both sides are standardised among their K values first (for a teacher
    stored as full-vocab ``a_t`` this equals standardising its raw top-K, up to eps).
    Symmetric in its two arguments.
    """
    if zscore not in ZSCORE_MODES:
        raise ValueError(f"zscore must be one of {ZSCORE_MODES}, got {zscore!r}")
    if zscore == "topk":
        student_values = zscore_within_topk(student_values, eps)
        teacher_values = zscore_within_topk(teacher_values, eps)
    p_s = torch.softmax(student_values / temperature, dim=-1)
    p_t = torch.softmax(teacher_values / temperature, dim=-1)
    return (p_s - p_t).abs().sum(-1)


def uld_loss(student_logits_local: torch.Tensor | None, teacher_topk_values: torch.Tensor,
             mask: torch.Tensor, *, k: int = 10, temperature: float = 1.0, eps: float = 1e-6,
             zscore: str = "full", vocab_size: int | None = None, tp_group=None,
             student_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
             reduction: str = "sum", chunk_tokens: int | None = None):
    """ULD distillation loss, sum reduction.

    Args:
        student_logits_local: ``[b, s, v_local]`` student logits shard (bf16/fp32), or None when
            ``student_topk`` is given.
        teacher_topk_values: ``[b, s, K]`` the teacher's standardised top-K values ``a_t``
            (descending), aligned to pivot positions; K must equal ``k``.
        mask: ``[b, s]`` 1 = aligned response position (gets a ULD term).
        k, temperature, eps: methods.md §2 (defaults 10, 1.0, 1e-6).
        zscore: ``"full"`` (default, full-vocab z-score) or ``"topk"`` (within the K values).
        vocab_size, tp_group: true vocab size (padding excluded) and the TP group.
        student_topk: precomputed ``(values, ids)`` from :func:`standardized_topk` (``"full"``)
            or :func:`distributed_topk` (``"topk"``), so ULD and GLD can share one top-K.
        reduction: ``"sum"`` -> 0-d sums; ``"sequence"`` -> per-sequence ``[b]`` sums/counts
            (for per-sample teacher weights, see ``combine_teachers``).
    Returns:
        ``(loss_sum, count)``: fp32 sum over masked-in positions and the number of them.
        All positions masked -> ``(0, 0)`` with zero gradients.
    """
    if zscore not in ZSCORE_MODES:
        raise ValueError(f"uld_loss: zscore must be one of {ZSCORE_MODES}, got {zscore!r}")
    check_reduction(reduction)
    if teacher_topk_values.dim() != 3:
        raise ValueError(f"uld_loss: teacher_topk_values must be [b, s, K], got "
                         f"{tuple(teacher_topk_values.shape)}")
    if teacher_topk_values.shape[-1] != k:
        raise ValueError(f"uld_loss: teacher top-K has K={teacher_topk_values.shape[-1]} but k={k}")
    if mask.shape != teacher_topk_values.shape[:2]:
        raise ValueError(f"uld_loss: mask {tuple(mask.shape)} does not match teacher "
                         f"[b, s] = {tuple(teacher_topk_values.shape[:2])}")
    if student_topk is None:
        if student_logits_local is None:
            raise ValueError("uld_loss: give student_logits_local or student_topk")
        if student_logits_local.shape[:2] != mask.shape:
            raise ValueError(f"uld_loss: student logits {tuple(student_logits_local.shape)} do not "
                             f"match mask {tuple(mask.shape)}")
        topk_fn = standardized_topk if zscore == "full" else distributed_topk
        kw = dict(vocab_size=vocab_size, tp_group=tp_group, chunk_tokens=chunk_tokens)
        if zscore == "full":
            kw["eps"] = eps
        student_values, _ = topk_fn(student_logits_local, k, **kw)
    else:
        student_values = student_topk[0]
        if student_values.shape != teacher_topk_values.shape:
            raise ValueError(f"uld_loss: student top-K {tuple(student_values.shape)} does not "
                             f"match teacher {tuple(teacher_topk_values.shape)}")
    keep = mask > 0                                                   # [b, s]
    # unaligned positions may hold anything in the teacher file: zero them before the math
    teacher = torch.where(keep[..., None], teacher_topk_values.to(student_values.dtype), 0.0)
    per_pos = uld_from_topk(student_values, teacher, temperature=temperature, eps=eps,
                            zscore=zscore)                             # [b, s]
    per_pos = torch.where(keep, per_pos, torch.zeros_like(per_pos))
    if reduction == "sequence":
        return per_pos.sum(-1), keep.sum(-1)
    return per_pos.sum(), keep.sum()
