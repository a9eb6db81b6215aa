"""Fusion losses over the student's vocab-parallel logits (SPEC §2-§5).

Every function takes this TP rank's logits shard ``[b, s, v_local]`` (Megatron's VocabUtility
layout, padded vocab) plus ``vocab_size`` (true size) and an explicit ``tp_group``; with
``tp_group=None`` it is the single-process reference. Losses return ``(sum, count)``.
"""

from megatron_fusion.losses.fpo import clip_to_reference, fpo_loss
from megatron_fusion.losses.gld import eccentricity, gld_from_topk, gld_loss, wasserstein_1d
from megatron_fusion.losses.logprobs import sequence_logprobs, token_logprobs
from megatron_fusion.losses.topk import distributed_topk, standardized_topk
from megatron_fusion.losses.uld import uld_from_topk, uld_loss, zscore_within_topk
from megatron_fusion.losses.weighting import combine_teachers

__all__ = [
    "distributed_topk", "standardized_topk", "uld_loss", "uld_from_topk", "zscore_within_topk",
    "gld_loss", "gld_from_topk", "eccentricity", "wasserstein_1d", "token_logprobs",
    "sequence_logprobs", "fpo_loss", "clip_to_reference", "combine_teachers",
]
