"""Pivot CE and the student's standardised top-K in ONE autograd.Function (the fusion stage's path).

The fusion stage needs, from the same vocab-parallel logits shard, the per-token cross entropy
(SPEC §4: Megatron's vocab-parallel CE; ``== -token_logprobs``) and the top-K of §2 feeding ULD
and GLD. As two autograd Functions each backward builds its own shard-sized gradient and autograd
adds them: two shard-sized tensors at the peak. Here the backward builds ONE gradient tensor,
chunk by chunk:

    dL/dz_j = g_ce * (softmax_j - [j == label])                          (CE)
              + bias + slope * z_j + [scatter (g_a / d + g_raw) at the top-K ids]_j   (top-K)

with the z-score terms of ``topk.zscore_grad_terms``; the softmax is recomputed from the saved
shard and the per-token logsumexp (nothing shard-sized is saved).

Forward: one sweep over the shard a chunk of tokens at a time — local top-K candidates (whose
first entry is the row maximum, so the CE needs no max pass), shifted moments for the z-score and
the sum-exp relative to the local max. Collectives per token (forward only):
  1. ONE all-gather of k int64 sort keys (k*tp candidates): the global top-K; its first value is
     the global max of the logits, which the CE uses instead of a MAX all-reduce;
  2. ONE float64 SUM all-reduce of four scalars: [sum-exp rescaled to the global max, target logit
     (from its owning shard), sum z, sum z^2].
The separate path issues one all-gather and three all-reduces (MAX of 1, SUM of 2, SUM of 2).
Values, ids and the CE are identical on every TP rank; backward communicates nothing.

    from megatron_fusion.losses import cross_entropy_and_topk
    out = cross_entropy_and_topk(logits, labels, k, vocab_size=V, tp_group=groups.tp)
    ce_sum = (out.ce * loss_mask).sum()
    uld_loss(None, t_vals, mask, k=k, student_topk=out.std_topk)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_fusion.losses._shard import (
    ShardLayout, all_reduce_, compute_dtype, owned_columns, token_chunks,
)
from megatron_fusion.losses.topk import (
    LocalCandidates, flat_shard, shifted_moments, zscore_grad_terms, zscore_stats,
)


class CETopK(NamedTuple):
    """Outputs of :func:`cross_entropy_and_topk` (identical on every TP rank)."""

    ce: torch.Tensor          # [b, s] per-token CE = -log p(label), fp32 (fp64 for fp64 logits)
    values: torch.Tensor      # [b, s, k] standardised top-K a = (z - mu) / (sigma + eps), descending
    raw_values: torch.Tensor  # [b, s, k] the same entries' raw logits z (for zscore: topk)
    ids: torch.Tensor         # [b, s, k] int64 global vocab ids, ties to the lower id

    @property
    def std_topk(self):
        """``(values, ids)``, as :func:`standardized_topk` returns them."""
        return self.values, self.ids

    @property
    def raw_topk(self):
        """``(raw_values, ids)``, as :func:`distributed_topk` returns them."""
        return self.raw_values, self.ids


class _VocabParallelCETopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_local, labels, k, vocab_size, tp_group, eps, chunk_tokens):
        lay, lead, x = flat_shard(logits_local, k, vocab_size, tp_group)   # x [N, v_local]
        lab = labels.reshape(-1).long()
        if lab.shape[0] != x.shape[0]:
            raise ValueError(f"cross_entropy_and_topk: labels {tuple(labels.shape)} do not match "
                             f"logits {tuple(logits_local.shape)}")
        n_tok, nv = x.shape[0], lay.n_valid
        cdt = compute_dtype(logits_local.dtype)
        dev = x.device
        # labels outside the vocab (e.g. -100): nobody owns them, no CE gradient anywhere
        lab_col, lab_owned = owned_columns(lab, lay)
        target = torch.where(lab_owned, x.gather(1, lab_col[:, None])[:, 0].to(cdt), 0.0)
        cands = LocalCandidates(n_tok, k, lay, cdt, dev)
        lmax = torch.full((n_tok,), -torch.inf, dtype=cdt, device=dev)
        sum_exp = torch.zeros(n_tok, dtype=cdt, device=dev)
        # per token, the one all-reduce: [sum-exp, target, sum z, sum z^2] in float64
        stats = torch.zeros((n_tok, 4), dtype=torch.float64, device=dev)
        for sl in token_chunks(n_tok, lay.v_local, chunk_tokens, dev):
            xc = x[sl, :nv]
            lmax[sl] = cands.add(sl, xc)        # the local top-1 is the row max: no amax pass
            if nv > 0:                          # a padding-only shard contributes zeros
                # bf16 - fp32 promotes to fp32: the conversion rides on the subtraction
                sum_exp[sl] = torch.sub(xc, lmax[sl, None]).exp_().sum(-1)
                stats[sl, 2:] = shifted_moments(xc, cdt)
        raw, ids = cands.merge(x, chunk_tokens)                        # all-gather of k*tp keys
        raw = raw.to(cdt)
        gmax = raw[:, 0]                                               # global max of the logits
        if lay.group is not None:
            sum_exp *= torch.exp(lmax - gmax)   # exp(-inf - gmax) = 0 for a padding-only shard
        stats[:, 0] = sum_exp
        stats[:, 1] = target
        all_reduce_(stats, lay)                                        # the one all-reduce (4)
        lse = gmax + stats[:, 0].to(cdt).log()
        ce = lse - stats[:, 1].to(cdt)
        mu, sigma = zscore_stats(stats[:, 2:], lay.vocab_size, cdt)
        values = (raw - mu[:, None]) / (sigma[:, None] + eps)
        ctx.save_for_backward(logits_local, lab_col, lab_owned, lse, ids, values, mu, sigma)
        ctx.lay, ctx.eps, ctx.chunk_tokens = lay, eps, chunk_tokens
        ctx.mark_non_differentiable(ids)
        return ce.view(labels.shape), values.view(*lead, k), raw.view(*lead, k), ids.view(*lead, k)

    @staticmethod
    def backward(ctx, grad_ce, grad_values, grad_raw, _grad_ids):
        logits_local, lab_col, lab_owned, lse, ids, values, mu, sigma = ctx.saved_tensors
        lay: ShardLayout = ctx.lay
        nv = lay.n_valid
        none = (None,) * 6
        if nv == 0 or (grad_ce is None and grad_values is None and grad_raw is None):
            return torch.zeros(logits_local.shape, dtype=logits_local.dtype,
                               device=logits_local.device), *none
        # the ONE shard-sized tensor of this backward; real columns are all written below
        grad = torch.empty(logits_local.shape, dtype=logits_local.dtype, device=logits_local.device)
        grad[..., nv:] = 0
        cdt = compute_dtype(logits_local.dtype)
        x = logits_local.reshape(-1, lay.v_local)                       # [N, v_local]
        grad2 = grad.view(-1, lay.v_local)
        # top-K: per-entry scatter sources and the dense z-score terms bias + slope * z
        topk_col, topk_owned = owned_columns(ids, lay)                  # [N, k]
        src = torch.zeros(ids.shape, dtype=cdt, device=x.device)
        bias = slope = None
        if grad_values is not None:
            g = grad_values.reshape(ids.shape).to(cdt)                  # same on every TP rank
            src, bias, slope = zscore_grad_terms(g, values, mu, sigma, ctx.eps, lay.vocab_size)
        if grad_raw is not None:
            src = src + grad_raw.reshape(ids.shape).to(cdt)
        src = torch.where(topk_owned, src, torch.zeros_like(src))
        if grad_ce is not None:
            g_ce = grad_ce.reshape(-1).to(cdt)                          # [N]
            onehot = torch.where(lab_owned, -g_ce, torch.zeros_like(g_ce))[:, None]
        direct = logits_local.dtype == cdt                               # fp32/fp64: in place
        for sl in token_chunks(x.shape[0], lay.v_local, ctx.chunk_tokens, x.device):
            xc = x[sl, :nv]
            gc = grad2[sl, :nv] if direct else torch.empty(
                (sl.stop - sl.start, nv), dtype=cdt, device=x.device)
            if grad_ce is not None:
                # g_ce * softmax_j, softmax recomputed from the saved logsumexp
                torch.sub(xc, lse[sl, None], out=gc)
                gc.exp_().mul_(g_ce[sl, None])
                if bias is not None:
                    gc.addcmul_(xc, slope[sl, None]).add_(bias[sl, None])
            elif bias is not None:
                torch.addcmul(bias[sl, None], xc, slope[sl, None], out=gc)
            else:
                gc.zero_()
            gc.scatter_add_(1, topk_col[sl], src[sl])                   # top-K entries, in place
            if grad_ce is not None:
                gc.scatter_add_(1, lab_col[sl, None], onehot[sl])        # - g_ce at the label
            if not direct:
                grad2[sl, :nv] = gc
        return grad, *none


def cross_entropy_and_topk(logits_local: torch.Tensor, labels: torch.Tensor, k: int, *,
                           eps: float = 1e-6, vocab_size: int | None = None, tp_group=None,
                           chunk_tokens: int | None = None) -> CETopK:
    """Per-token vocab-parallel CE and the global standardised top-K of one logits shard.

    Args:
        logits_local: ``[b, s, v_local]`` (any ``[..., v_local]``, bf16/fp16/fp32/fp64) this TP
            rank's shard in Megatron's VocabUtility layout.
        labels: ``[b, s]`` global token ids; ids outside ``[0, vocab_size)`` (e.g. -100) give a
            meaningless CE and no CE gradient (mask them out, as with :func:`token_logprobs`).
        k: top-K size, ``1 <= k <= vocab_size`` (may exceed ``v_local``).
        eps: z-score epsilon of SPEC §2.
        vocab_size: true vocabulary size; padded columns never count and get zero gradient.
        tp_group: the TP group, or None when the shard is the whole vocabulary.
        chunk_tokens: tokens per chunk of the local work (default: a fixed element budget).
    Returns:
        :class:`CETopK` ``(ce, values, raw_values, ids)``: ``ce == -token_logprobs(...)``,
        ``(values, ids) == standardized_topk(...)``, ``(raw_values, ids) == distributed_topk(...)``;
        all differentiable but ids, and backward builds one shard-sized gradient.
    Communication (forward, per token and rank): one all-gather of k int64 keys and one all-reduce
    of four float64 scalars; backward none.
    """
    return CETopK(*_VocabParallelCETopK.apply(logits_local, labels, k, vocab_size, tp_group, eps,
                                              chunk_tokens))
