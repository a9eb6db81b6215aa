"""Teacher top-K log-probs from the stored standardised values and two per-position scalars.

A teacher's top-K is stored as ``a = (z - mu) / (sigma + eps)`` (docs/methods.md §2) and its ids. With two
more fp32 scalars per aligned position, ``d = sigma + eps`` and ``c = mu - logsumexp(z)`` over the
teacher's FULL vocabulary (8 B: 60 + 8 = 68 B per position at K = 10), its exact top-K log-probs
come back:

    log p_t(i) = a_i * d + c          (z_i = a_i d + mu, log p_t(i) = z_i - lse)

Precision: the error is ``|a_stored - a| * d``; fp32 ``a`` is exact to ~1e-6 relative, a bf16
``a`` (8 significant bits) is off by up to ``ulp_bf16(a) / 2 * d`` (~0.1 nats at a = 10, d = 3),
fp16 ``a`` about 8x less (docs/methods.md §9).
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
