"""Teacher top-K log-probs: computed on the teacher's vocab shards, stored, recovered (methods.md §6).

The relation between the standardised top-K values ``a = (z - mu) / (sigma + eps)`` of
methods.md §2 and the teacher's log-probs over its FULL vocabulary, with two per-position scalars
``d = sigma + eps`` and ``c = mu - logsumexp(z)``:

    log p_t(i) = a_i * d + c          (z_i = a_i d + mu, log p_t(i) = z_i - lse)

What is stored (format-4 shards and the online wire): the log-probs themselves in 16-bit fixed
point (``encode_logprobs``: step 2^-10 over [-63.999, 0], error <= 2^-11 = 4.9e-4 nats) plus
``d`` and ``c`` in fp32, and ``a`` is derived on read (``standardized_from_logprobs``). Storing
``a`` instead does not reach 1e-3: the error of ``a * d + c`` is ``|a_stored - a| * d``, and a
bf16 ``a`` (8 significant bits) is off by up to ``ulp_bf16(a) / 2 * d`` (~0.1 nats at a = 10,
d = 3), fp16 about 8x less (``recover_logprobs``, kept for that comparison).

``topk_logprob_stats`` computes ``log p`` at the top-K ids, ``d`` and ``c`` from the teacher's
vocab-parallel logits (the precompute and online teachers, ``teachers.topk``).
"""

from __future__ import annotations

import torch


def logprob_scalars(teacher_logits: torch.Tensor, eps: float = 1e-6):
    """Full-vocab teacher logits ``[..., V]`` -> ``(d, c)`` fp32 ``[...]``: ``d = sigma + eps``
    (population std over V) and ``c = mu - logsumexp(z)``, computed in float64."""
    z = teacher_logits.double()
    mu = z.mean(-1)
    sigma = z.var(-1, unbiased=False).sqrt()
    return (sigma + eps).float(), (mu - torch.logsumexp(z, -1)).float()


def recover_logprobs(values: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Stored standardised top-K ``values [..., K]`` (any float dtype) and the two scalars
    ``[...]`` -> the teacher's top-K log-probs over its full vocabulary, fp32 ``[..., K]``."""
    if d.shape != values.shape[:-1] or c.shape != values.shape[:-1]:
        raise ValueError(f"recover_logprobs: scalars {tuple(d.shape)}/{tuple(c.shape)} must be "
                         f"the values' leading shape {tuple(values.shape[:-1])}")
    return (values.double() * d.double()[..., None] + c.double()[..., None]).float()


# ------------------------------------------------------------------------------------------------
# What a top-K shard (format 4) and the online wire store: log-probs in 16-bit fixed point
# ------------------------------------------------------------------------------------------------
# q = round(-log p / LOGP_STEP), an unsigned 16-bit code: log p = -q * LOGP_STEP over
# [-(2^16 - 1) * 2^-10, 0] = [-63.999, 0]; the rounding error is <= LOGP_STEP / 2 = 4.9e-4 nats.
# A log-prob below -63.999 (p < 1.6e-28) is stored as -63.999 (``logp_clamped`` counts them).
LOGP_STEP = 2.0 ** -10
LOGP_QMAX = (1 << 16) - 1
LOGP_MIN = -LOGP_QMAX * LOGP_STEP


def encode_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Log-probs ``[...]`` (<= 0, any float dtype) -> their uint16 codes as int16 bit patterns
    (the dtype numpy, gloo and ``torch.save`` all carry). Values below ``LOGP_MIN`` are clamped."""
    q = torch.round(-logp.double() / LOGP_STEP).clamp_(0, LOGP_QMAX).to(torch.int32)
    return torch.where(q > 32767, q - 65536, q).to(torch.int16)


def decode_logprobs(codes: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns of ``encode_logprobs`` -> log-probs float32 (exact: q < 2^16 and the
    step is a power of two)."""
    q = codes.to(torch.int32) & LOGP_QMAX
    return q.to(torch.float32) * -LOGP_STEP


def standardized_from_logprobs(logp: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Top-K log-probs ``[..., K]`` and the scalars ``d = sigma + eps``, ``c = mu - lse`` ``[...]``
    -> the standardised values ``a = (log p - c) / d`` of methods.md §2 (float32), the inverse of
    ``recover_logprobs``. What ULD / GLD read from a format-4 shard."""
    if d.shape != logp.shape[:-1] or c.shape != logp.shape[:-1]:
        raise ValueError(f"standardized_from_logprobs: scalars {tuple(d.shape)}/{tuple(c.shape)} "
                         f"must be the log-probs' leading shape {tuple(logp.shape[:-1])}")
    return ((logp.double() - c.double()[..., None]) / d.double()[..., None]).float()


def topk_logprob_stats(logits_local: torch.Tensor, ids: torch.Tensor, *, eps: float = 1e-6,
                       vocab_size: int | None = None, tp_group=None,
                       chunk_tokens: int | None = None):
    """Vocab-parallel: a teacher's log-probs at ``ids`` and the two scalars of its z-score.

    ``logits_local [..., v_local]`` this TP rank's shard (padding columns >= ``vocab_size`` never
    count), ``ids [..., K]`` global ids (the teacher's top-K). Returns float64 ``log p [..., K]``
    (``z_id - logsumexp(z)`` over the true vocabulary), ``d = sigma + eps`` and
    ``c = mu - logsumexp(z)`` ``[...]``, the same on every TP rank. ``mu`` / ``sigma`` come from
    the same shifted float64 moments as ``standardized_topk`` (so ``d`` is the one its values were
    divided by). Collectives per token: one MAX all-reduce of one scalar, one SUM all-reduce of
    ``3 + K`` float64 scalars (sum-exp, the two moments, the logits at ``ids`` from their owners).
    Forward only (no autograd); one sweep over the shard, a chunk of tokens at a time.
    """
    from megatron_fusion.losses._shard import (all_reduce_, compute_dtype, owned_columns,
                                               shard_layout, token_chunks)
    from megatron_fusion.losses.topk import shifted_moments, zscore_stats
    import torch.distributed as dist

    lay = shard_layout(logits_local, vocab_size, tp_group)
    lead, k = ids.shape[:-1], ids.shape[-1]
    if tuple(lead) != tuple(logits_local.shape[:-1]):
        raise ValueError(f"topk_logprob_stats: ids {tuple(ids.shape)} do not match logits "
                         f"{tuple(logits_local.shape)}")
    x = logits_local.detach().reshape(-1, lay.v_local)                 # [N, v_local]
    n_tok, nv, dev = x.shape[0], lay.n_valid, x.device
    cdt = compute_dtype(x.dtype)
    col, owned = owned_columns(ids.reshape(-1, k).to(dev), lay)
    stats = torch.zeros((n_tok, 3 + k), dtype=torch.float64, device=dev)  # [sumexp, s1, s2, z_ids]
    stats[:, 3:] = torch.where(owned, x.gather(1, col).double(), 0.0)
    lmax = torch.full((n_tok,), -torch.inf, dtype=torch.float64, device=dev)
    chunks = list(token_chunks(n_tok, lay.v_local, chunk_tokens, dev)) if nv > 0 else []
    for sl in chunks:
        lmax[sl] = x[sl, :nv].amax(-1).double()
    gmax = all_reduce_(lmax, lay, op=dist.ReduceOp.MAX)                 # the MAX all-reduce
    for sl in chunks:
        xc = x[sl, :nv]
        stats[sl, 0] = torch.sub(xc, gmax[sl, None].to(cdt)).exp_().sum(-1).double()
        stats[sl, 1:3] = shifted_moments(xc, cdt)
    all_reduce_(stats, lay)                                             # the SUM all-reduce
    lse = gmax + stats[:, 0].log()
    mu, sigma = zscore_stats(stats[:, 1:3], lay.vocab_size, torch.float64)
    logp = stats[:, 3:] - lse[:, None]
    return logp.view(*lead, k), (sigma + eps).view(lead), (mu - lse).view(lead)
