"""FPO loss (InfiFPO; methods.md §5): DPO whose reference is a fusion of clipped source log-probs.

All inputs are per-pair, length-normalised sequence log-probs ``[b]`` (sources ``[b, N]``); the
vocab-parallel part is ``sequence_logprobs``. Pure torch, no collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FUSION_MODES = ("mean", "max_margin")


def clip_to_reference(source_logps: torch.Tensor, ref_logps: torch.Tensor,
                      ref_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``min(max(l_i, l_ref - d), l_ref + d)`` per source -> (clipped ``[b, N]``, was-clipped mask)."""
    lo = (ref_logps - ref_offset)[:, None]
    hi = (ref_logps + ref_offset)[:, None]
    clipped = torch.minimum(torch.maximum(source_logps, lo), hi)
    return clipped, (source_logps < lo) | (source_logps > hi)


def fpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             sources_chosen: torch.Tensor, sources_rejected: torch.Tensor, *,
             beta: float = 2.5, ref_offset: float = 5.0, fusion: str = "mean"):
    """Per-pair FPO losses.

    Args:
        policy_chosen, policy_rejected: ``[b]`` ℓ_θ(y_w), ℓ_θ(y_l) (length-normalised log-probs).
        ref_chosen, ref_rejected: ``[b]`` ℓ_ref of the frozen initial pivot.
        sources_chosen, sources_rejected: ``[b, N]`` ℓ_i per source (each with its own tokenizer).
        beta: DPO temperature (2.5, InfiFPO with length normalisation).
        ref_offset: clipping half-width δ around ℓ_ref (5.0).
        fusion: ``"mean"`` (γ_i = 1/N) or ``"max_margin"`` (one-hot on the source with the largest
            ``clip_i(y_w) - clip_i(y_l)`` of that pair; ties to the lower source index).
    Returns:
        ``(losses [b], metrics)``; sum ``losses`` and divide once by the global pair count.
        metrics (detached batch means unless noted): ``rewards/chosen``, ``rewards/rejected``
        (β·(ℓ_θ − fused)), ``fpo/margin``, ``fpo/accuracy``, ``fpo/clip_fraction`` (of the 2·b·N
        source values) and, for max_margin, ``fpo/selected/source_i`` (pair counts).
    """
    if fusion not in FUSION_MODES:
        raise ValueError(f"fpo_loss: fusion must be one of {FUSION_MODES}, got {fusion!r}")
    if sources_chosen.dim() != 2 or sources_chosen.shape != sources_rejected.shape \
            or sources_chosen.shape[0] != policy_chosen.shape[0]:
        raise ValueError(f"fpo_loss: sources must both be [b, N] with b = {policy_chosen.shape[0]}, "
                         f"got {tuple(sources_chosen.shape)} and {tuple(sources_rejected.shape)}")
    clip_w, was_clipped_w = clip_to_reference(sources_chosen, ref_chosen, ref_offset)
    clip_l, was_clipped_l = clip_to_reference(sources_rejected, ref_rejected, ref_offset)
    n_src = clip_w.shape[1]
    if fusion == "mean":
        gamma = torch.full_like(clip_w, 1.0 / n_src)
    else:
        best = (clip_w - clip_l).argmax(-1)          # argmax returns the first maximum
        gamma = F.one_hot(best, n_src).to(clip_w.dtype)
    fused_w = (gamma * clip_w).sum(-1)
    fused_l = (gamma * clip_l).sum(-1)
    reward_w = beta * (policy_chosen - fused_w)
    reward_l = beta * (policy_rejected - fused_l)
    logits = reward_w - reward_l
    losses = -F.logsigmoid(logits)
    with torch.no_grad():
        metrics = {
            "rewards/chosen": reward_w.mean(),
            "rewards/rejected": reward_l.mean(),
            "fpo/margin": logits.mean(),
            "fpo/accuracy": (logits > 0).float().mean(),
            "fpo/clip_fraction": torch.cat([was_clipped_w, was_clipped_l]).float().mean(),
        }
        if fusion == "max_margin":
            counts = torch.bincount(best, minlength=n_src)
            for i in range(n_src):
                metrics[f"fpo/selected/source_{i}"] = counts[i]
    return losses, metrics
