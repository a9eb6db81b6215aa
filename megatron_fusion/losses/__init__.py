"""Fusion losses over the student's vocab-parallel logits (docs/methods.md §2-§5).

Every function takes this TP rank's logits shard ``[b, s, v_local]`` (Megatron's VocabUtility
layout: rank r holds global ids ``[r * v_local, (r + 1) * v_local)``, the vocabulary padded to a
multiple of ``tp * 128``) plus ``vocab_size`` (the TRUE tokenizer size: padded columns never enter a
top-K, a mean or a softmax and get zero gradient) and an explicit ``tp_group``; with
``tp_group=None`` the shard is the whole vocabulary and nothing is communicated (the serial
reference). Losses return ``(sum, count)``: normalise once, across micro-batches and DP ranks.

Typical fusion-stage use on the last pipeline stage (GPTModel returns ``[b, s, v_local]``)::

    # CE (== Megatron's CE == -token_logprobs) and the shared top-K in ONE autograd.Function:
    # one all-gather + one all-reduce per token, one shard-sized gradient in backward
    out = cross_entropy_and_topk(logits, labels, k, vocab_size=V, tp_group=groups.tp)
    ce_sum = (out.ce * loss_mask).sum()
    uld_sum, n_pos = uld_loss(None, t_vals, aligned_mask, k=k, student_topk=out.std_topk)
    gld_sum, n_seq = gld_loss(None, t_vals, t_ids, aligned_mask, k=k, student_topk=out.std_topk)

Hybrid cross-tokenizer loss (docs/methods.md §9), in the same Function (two more all-reduced
scalars per token, no new collective)::

    s, n = hybrid_loss(logits, t_logprobs, t_pivot_ids, mask, k=k, vocab_size=V, tp_group=groups.tp)

Separately, ``standardized_topk`` / ``distributed_topk`` and ``token_logprobs`` compute the same
values (each with its own shard-sized gradient).

Replicated outputs: values, ids and losses are identical on every TP rank, and each rank's
backward fills only its own columns, so no extra TP reduction of the loss is needed (as with
Megatron's vocab-parallel cross entropy).
"""

from megatron_fusion.losses.ce_topk import (CETopK, CETopKMatch, cross_entropy_and_topk,
                                            cross_entropy_topk_and_match)
from megatron_fusion.losses.fpo import clip_to_reference, fpo_loss
from megatron_fusion.losses.gld import eccentricity, gld_from_topk, gld_loss, wasserstein_1d
from megatron_fusion.losses.hybrid import (HybridLossConfig, HybridTerms, hybrid_from_outputs,
                                           hybrid_loss, hybrid_terms)
from megatron_fusion.losses.logprobs import sequence_logprobs, token_logprobs
from megatron_fusion.losses.topk import distributed_topk, standardized_topk
from megatron_fusion.losses.uld import uld_from_topk, uld_loss, zscore_within_topk
from megatron_fusion.losses.weighting import combine_teachers

__all__ = [
    "cross_entropy_and_topk", "CETopK", "cross_entropy_topk_and_match", "CETopKMatch",
    "hybrid_loss", "hybrid_from_outputs", "hybrid_terms", "HybridTerms", "HybridLossConfig",
    "distributed_topk", "standardized_topk", "uld_loss", "uld_from_topk", "zscore_within_topk",
    "gld_loss", "gld_from_topk", "eccentricity", "wasserstein_1d", "token_logprobs",
    "sequence_logprobs", "fpo_loss", "clip_to_reference", "combine_teachers",
]
