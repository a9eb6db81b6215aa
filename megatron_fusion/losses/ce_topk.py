"""Pivot CE and the student's standardised top-K in ONE autograd.Function (the fusion stage's path).

The fusion stage needs, from the same vocab-parallel logits shard, the per-token cross entropy
(docs/methods.md §4: Megatron's vocab-parallel CE; ``== -token_logprobs``) and the top-K of §2 feeding ULD
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

The hybrid cross-tokenizer loss (docs/methods.md §9, ``losses/hybrid.py``) runs in the same
Function (``cross_entropy_topk_and_match``): given the teacher's matched pivot ids ``j_i`` and
probabilities ``p_t(i)`` it also returns ``lse``, ``sum_i p_t(i) z[j_i]`` and (tail bucket)
``sum_i softmax(z)[j_i]``, the owned ids summed per rank and carried as one (two) more scalars in
the same all-reduce; their gradients ``d lse -> softmax``, ``scatter p_t at j_i`` and
``scatter softmax_j at j_i - sm * softmax`` go into the same single gradient buffer.

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
    def forward(ctx, logits_local, labels, k, vocab_size, tp_group, eps, chunk_tokens,
                match_ids=None, match_probs=None, tail_bucket=False):
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
        # per token, the one all-reduce: [sum-exp, target, sum z, sum z^2] in float64, plus for
        # the hybrid loss [sum_M p_t z_j] and, with the tail bucket, [sum_M exp(z_j - max)]
        # several teachers at once: match_ids [b, s, G, Kt] gives G scalars of each kind
        hybrid = match_ids is not None
        grouped = hybrid and match_ids.dim() == logits_local.dim() + 1
        n_grp = match_ids.shape[-2] if grouped else 1
        n_stats = 4 + n_grp * (int(hybrid) + int(hybrid and tail_bucket))
        stats = torch.zeros((n_tok, n_stats), dtype=torch.float64, device=dev)
        zt_cols = slice(4, 4 + n_grp)
        sm_cols = slice(4 + n_grp, 4 + 2 * n_grp)
        m_col = m_owned = m_p = None
        if hybrid:   # matched teacher entries -> pivot ids (-1: unmatched); this rank's share
            m_ids = match_ids.reshape(n_tok, -1).long()                          # [N, G*Kt]
            m_col, m_owned = owned_columns(m_ids, lay)
            m_p = torch.where(m_ids >= 0, match_probs.reshape(m_ids.shape).to(cdt), 0.0)
            z_m = torch.where(m_owned, x.gather(1, m_col).to(cdt), 0.0)          # [N, G*Kt]
            stats[:, zt_cols] = (m_p * z_m).view(n_tok, n_grp, -1).sum(-1)
        for sl in token_chunks(n_tok, lay.v_local, chunk_tokens, dev):
            xc = x[sl, :nv]
            lmax[sl] = cands.add(sl, xc)        # the local top-1 is the row max: no amax pass
            if nv > 0:                          # a padding-only shard contributes zeros
                # bf16 - fp32 promotes to fp32: the conversion rides on the subtraction
                sum_exp[sl] = torch.sub(xc, lmax[sl, None]).exp_().sum(-1)
                stats[sl, 2:4] = shifted_moments(xc, cdt)
        raw, ids = cands.merge(x, chunk_tokens)                        # all-gather of k*tp keys
        raw = raw.to(cdt)
        gmax = raw[:, 0]                                               # global max of the logits
        if lay.group is not None:
            sum_exp *= torch.exp(lmax - gmax)   # exp(-inf - gmax) = 0 for a padding-only shard
        stats[:, 0] = sum_exp
        stats[:, 1] = target
        if hybrid and tail_bucket:   # the global max is known from the all-gather already
            stats[:, sm_cols] = torch.where(m_owned, (z_m - gmax[:, None]).exp(), 0.0) \
                .view(n_tok, n_grp, -1).sum(-1)
        all_reduce_(stats, lay)                                        # the one all-reduce
        lse = gmax + stats[:, 0].to(cdt).log()
        ce = lse - stats[:, 1].to(cdt)
        mu, sigma = zscore_stats(stats[:, 2:4], lay.vocab_size, cdt)
        values = (raw - mu[:, None]) / (sigma[:, None] + eps)
        zt = stats[:, zt_cols].to(cdt) if hybrid else torch.zeros_like(lse)          # [N, G]
        # student mass on the matched ids: sum_M exp(z_j - max) / sum exp(z - max)
        sm = (stats[:, sm_cols] / stats[:, :1]).to(cdt) if hybrid and tail_bucket \
            else torch.zeros_like(lse)
        ctx.save_for_backward(logits_local, lab_col, lab_owned, lse, ids, values, mu, sigma,
                              m_col, m_owned, m_p, sm)
        ctx.lay, ctx.eps, ctx.chunk_tokens = lay, eps, chunk_tokens
        ctx.hybrid, ctx.tail, ctx.n_grp = hybrid, hybrid and tail_bucket, n_grp
        ctx.mark_non_differentiable(ids)
        if not hybrid:
            ctx.mark_non_differentiable(zt)
        if not ctx.tail:
            ctx.mark_non_differentiable(sm)
        per_group = (*labels.shape, n_grp) if grouped else labels.shape
        return (ce.view(labels.shape), values.view(*lead, k), raw.view(*lead, k),
                ids.view(*lead, k), lse.view(labels.shape),
                zt.view(per_group if hybrid else labels.shape),
                sm.view(per_group if ctx.tail else labels.shape))

    @staticmethod
    def backward(ctx, grad_ce, grad_values, grad_raw, _grad_ids, grad_lse, grad_zt, grad_sm):
        (logits_local, lab_col, lab_owned, lse, ids, values, mu, sigma,
         m_col, m_owned, m_p, sm) = ctx.saved_tensors
        lay: ShardLayout = ctx.lay
        nv = lay.n_valid
        none = (None,) * 9
        if not ctx.hybrid:
            grad_zt = None
        if not ctx.tail:
            grad_sm = None
        if nv == 0 or all(g is None for g in (grad_ce, grad_values, grad_raw, grad_lse, grad_zt,
                                              grad_sm)):
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
        # the softmax coefficient per token: CE (d lse), lse itself, and the tail bucket's
        # sm = sum_M softmax_j (d sm / d z = [scatter softmax_j at M] - sm * softmax)
        g_soft = None
        if grad_ce is not None:
            g_ce = grad_ce.reshape(-1).to(cdt)                          # [N]
            onehot = torch.where(lab_owned, -g_ce, torch.zeros_like(g_ce))[:, None]
            g_soft = g_ce
        if grad_lse is not None:
            g_lse = grad_lse.reshape(-1).to(cdt)
            g_soft = g_lse if g_soft is None else g_soft + g_lse
        m_src = None
        if grad_zt is not None or grad_sm is not None:
            # matched entries this rank owns: d zt / d z_j = p_t; d sm / d z_j = softmax_j;
            # entries [N, G*Kt] are G groups of Kt, each group with its own zt / sm
            n_tok, n_grp = m_p.shape[0], ctx.n_grp
            m_src = torch.zeros(m_p.shape, dtype=cdt, device=x.device)
            if grad_zt is not None:
                g_zt = grad_zt.reshape(n_tok, n_grp, 1).to(cdt)
                m_src = m_src + (g_zt * m_p.view(n_tok, n_grp, -1)).view(m_p.shape)
            if grad_sm is not None:
                g_sm = grad_sm.reshape(n_tok, n_grp).to(cdt)
                soft_m = (x.gather(1, m_col).to(cdt) - lse[:, None]).exp()
                soft_m = torch.where(m_owned, soft_m, 0.0).view(n_tok, n_grp, -1)
                m_src = m_src + (g_sm[..., None] * soft_m).view(m_p.shape)
                # sm is the forward's output: sum_M softmax over all ranks (replicated)
                d_soft = (g_sm * sm.view(n_tok, n_grp)).sum(-1)
                g_soft = -d_soft if g_soft is None else g_soft - d_soft
            m_src = torch.where(m_owned, m_src, torch.zeros_like(m_src))
        direct = logits_local.dtype == cdt                               # fp32/fp64: in place
        for sl in token_chunks(x.shape[0], lay.v_local, ctx.chunk_tokens, x.device):
            xc = x[sl, :nv]
            gc = grad2[sl, :nv] if direct else torch.empty(
                (sl.stop - sl.start, nv), dtype=cdt, device=x.device)
            if g_soft is not None:
                # g_soft * softmax_j, softmax recomputed from the saved logsumexp
                torch.sub(xc, lse[sl, None], out=gc)
                gc.exp_().mul_(g_soft[sl, None])
                if bias is not None:
                    gc.addcmul_(xc, slope[sl, None]).add_(bias[sl, None])
            elif bias is not None:
                torch.addcmul(bias[sl, None], xc, slope[sl, None], out=gc)
            else:
                gc.zero_()
            gc.scatter_add_(1, topk_col[sl], src[sl])                   # top-K entries, in place
            if m_src is not None:
                gc.scatter_add_(1, m_col[sl], m_src[sl])                # matched teacher entries
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
        eps: z-score epsilon of methods.md §2.
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
                                              chunk_tokens)[:4])


class CETopKMatch(NamedTuple):
    """Outputs of :func:`cross_entropy_topk_and_match` (identical on every TP rank)."""

    ce: torch.Tensor            # [b, s] as CETopK.ce
    values: torch.Tensor        # [b, s, k] as CETopK.values
    raw_values: torch.Tensor    # [b, s, k] as CETopK.raw_values
    ids: torch.Tensor           # [b, s, k] as CETopK.ids
    lse: torch.Tensor           # [b, s] logsumexp of the student logits over the true vocab
    matched_z: torch.Tensor     # [b, s] sum_i p_t(i) z_s[j_i] over the matched entries ([b, s, G]
                                # for G teachers at once: match_ids [b, s, G, Kt])
    matched_mass: torch.Tensor  # [b, s] ([b, s, G]) sum_i p_s(j_i) over the matched entries
                                # (0 without tail)

    @property
    def std_topk(self):
        return self.values, self.ids

    @property
    def raw_topk(self):
        return self.raw_values, self.ids

    def teacher(self, j: int) -> "CETopKMatch":
        """Teacher ``j``'s view of a grouped call (``match_ids [b, s, G, Kt]``): the shared CE,
        top-K and lse with that teacher's ``matched_z`` / ``matched_mass`` ``[b, s]``."""
        mass = self.matched_mass[..., j] if self.matched_mass.dim() == self.lse.dim() + 1 \
            else self.matched_mass
        return self._replace(matched_z=self.matched_z[..., j], matched_mass=mass)


def cross_entropy_topk_and_match(logits_local: torch.Tensor, labels: torch.Tensor, k: int, *,
                                 match_ids: torch.Tensor, match_probs: torch.Tensor,
                                 tail_bucket: bool = False, eps: float = 1e-6,
                                 vocab_size: int | None = None, tp_group=None,
                                 chunk_tokens: int | None = None) -> CETopKMatch:
    """:func:`cross_entropy_and_topk` plus the student quantities of the hybrid loss (§9).

    Args:
        match_ids: ``[b, s, Kt]`` int pivot (student) id of each teacher top-K entry, -1 where
            the teacher token has no pivot match. The matched ids of one position must be
            distinct (``megatron_fusion.losses.hybrid`` checks it). ``[b, s, G, Kt]``: G
            teachers in the same call (the fuse stage): one sweep, one gradient, and G scalars
            of each kind in the one all-reduce; ``matched_z`` / ``matched_mass`` are then
            ``[b, s, G]`` (:meth:`CETopKMatch.teacher` gives teacher j's view).
        match_probs: same shape as ``match_ids``, the teacher's probability of each entry
            (constants; entries with ``match_ids == -1`` are ignored).
        tail_bucket: also return ``matched_mass`` (one more all-reduced scalar per token and
            teacher).
        Others as :func:`cross_entropy_and_topk`.
    Returns:
        :class:`CETopKMatch`; ``lse``, ``matched_z`` and ``matched_mass`` are differentiable and
        their gradients land in the same single shard-sized gradient as the CE and the top-K.
    Communication (forward, per token and rank): the same ONE all-gather of k int64 keys and ONE
    float64 all-reduce, now of 4 + G scalars (4 + 2G with the tail bucket); backward none.
    """
    lead = tuple(logits_local.shape[:-1])
    if match_ids.shape != match_probs.shape or match_ids.dim() not in (len(lead) + 1,
                                                                      len(lead) + 2) \
            or tuple(match_ids.shape[:len(lead)]) != lead:
        raise ValueError(f"cross_entropy_topk_and_match: match_ids {tuple(match_ids.shape)} and "
                         f"match_probs {tuple(match_probs.shape)} must both be [b, s, Kt] or "
                         f"[b, s, G, Kt] with [b, s] = {lead}")
    return CETopKMatch(*_VocabParallelCETopK.apply(
        logits_local, labels, k, vocab_size, tp_group, eps, chunk_tokens,
        match_ids, match_probs.detach(), bool(tail_bucket)))
