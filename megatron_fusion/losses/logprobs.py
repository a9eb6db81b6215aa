"""Vocab-parallel log-probabilities of the labels (methods.md §5 building block; ``-token_logprobs``
is the trainer's CE, equal to megatron-core's ``vocab_parallel_cross_entropy``).

Per token: ``log p(label) = z_label - max - log(sum exp(z - max))`` over the true vocabulary.
Collectives (forward only, per token): one MAX all-reduce of one scalar, then ONE SUM all-reduce of
two scalars (local sum-exp rescaled to the global max, target logit from its owning shard). The
shard is read once in forward (per-chunk max and sum-exp, online-softmax style). Backward recomputes
``softmax = exp(z - logsumexp)`` chunk by chunk from the saved logits shard and the saved
per-token ``logsumexp``, so nothing shard-sized is saved.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_fusion.losses._shard import all_reduce_, compute_dtype, shard_layout, token_chunks


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_local, labels, vocab_size, tp_group, chunk_tokens):
        lay = shard_layout(logits_local, vocab_size, tp_group)
        x = logits_local.reshape(-1, lay.v_local)                       # [N, v_local]
        lab = labels.reshape(-1).long()
        if lab.shape[0] != x.shape[0]:
            raise ValueError(f"token_logprobs: labels {tuple(labels.shape)} do not match logits "
                             f"{tuple(logits_local.shape)}")
        cdt = compute_dtype(logits_local.dtype)
        n_tok, nv = x.shape[0], lay.n_valid
        local = lab - lay.start
        owned = (local >= 0) & (local < nv)   # labels outside the vocab: nobody owns them
        col = torch.where(owned, local, torch.zeros_like(local))
        target = torch.where(owned, x.gather(1, col[:, None])[:, 0].to(cdt), 0.0)
        # one sweep: each chunk's local max and sum-exp while the chunk is hot (online softmax),
        # rescaled to the global max after the MAX all-reduce
        lmax = torch.full((n_tok,), -torch.inf, dtype=cdt, device=x.device)
        stats = torch.zeros((n_tok, 2), dtype=cdt, device=x.device)     # [sum-exp, target]
        stats[:, 1] = target
        if nv > 0:
            for sl in token_chunks(n_tok, lay.v_local, chunk_tokens, x.device):
                xc = x[sl, :nv]
                lmax[sl] = xc.amax(-1).to(cdt)
                # bf16 - fp32 promotes to fp32: the conversion rides on the subtraction
                stats[sl, 0] = torch.sub(xc, lmax[sl, None]).exp_().sum(-1)
        gmax = all_reduce_(lmax.clone(), lay, op=dist.ReduceOp.MAX)     # all-reduce 1 (1 scalar)
        if lay.group is not None:
            # exp(-inf - gmax) = 0 for a padding-only shard
            stats[:, 0] *= torch.exp(lmax - gmax)
        all_reduce_(stats, lay)                                          # all-reduce 2 (2 scalars)
        lse = gmax + stats[:, 0].log()
        ctx.save_for_backward(logits_local, col, owned, lse)
        ctx.lay, ctx.chunk_tokens = lay, chunk_tokens
        return (stats[:, 1] - lse).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits_local, col, owned, lse = ctx.saved_tensors
        lay = ctx.lay
        nv = lay.n_valid
        if nv == 0:
            return torch.zeros(logits_local.shape, dtype=logits_local.dtype,
                               device=logits_local.device), None, None, None, None
        # contiguous (the input may be a strided view); real columns are all written below
        grad = torch.empty(logits_local.shape, dtype=logits_local.dtype, device=logits_local.device)
        grad[..., nv:] = 0
        cdt = compute_dtype(logits_local.dtype)
        x = logits_local.reshape(-1, lay.v_local)
        grad2 = grad.view(-1, lay.v_local)
        g = grad_out.reshape(-1).to(cdt)                                  # [N]
        onehot = torch.where(owned, g, torch.zeros_like(g))[:, None]      # g at the owned label
        direct = logits_local.dtype == cdt                                # fp32/fp64: in place
        for sl in token_chunks(x.shape[0], lay.v_local, ctx.chunk_tokens, x.device):
            # d logp / dz_j = [j == label] - softmax_j ; padding columns stay 0
            gc = grad2[sl, :nv] if direct else torch.empty(
                (sl.stop - sl.start, nv), dtype=cdt, device=x.device)
            torch.sub(x[sl, :nv], lse[sl, None], out=gc)
            gc.exp_().mul_(-g[sl, None])
            gc.scatter_add_(1, col[sl, None], onehot[sl])
            if not direct:
                grad2[sl, :nv] = gc
        return grad, None, None, None, None


def token_logprobs(logits_local: torch.Tensor, labels: torch.Tensor, *,
                   vocab_size: int | None = None, tp_group=None,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """Log-softmax over the TP-sharded vocab, taken at the labels.

    Args:
        logits_local: ``[b, s, v_local]`` (or any ``[..., v_local]``) this rank's shard.
        labels: ``[b, s]`` global token ids; must lie in ``[0, vocab_size)`` where the result is
            used (other ids, e.g. -100, give a meaningless value and no gradient to any column).
        vocab_size: true vocab size; padded columns are excluded from the softmax.
    Returns:
        ``[b, s]`` log-probabilities (fp32; fp64 for fp64 logits), identical on all TP ranks.
    """
    return _VocabParallelLogProb.apply(logits_local, labels, vocab_size, tp_group, chunk_tokens)


def sequence_logprobs(logits_local: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *,
                      vocab_size: int | None = None, tp_group=None,
                      chunk_tokens: int | None = None):
    """Summed log-probability of each sequence's masked-in labels.

    Args: logits_local ``[b, s, v_local]``, labels ``[b, s]`` (already shifted so that position t
        scores labels[t]), mask ``[b, s]`` (1 = response token).
    Returns: ``(logp_sum [b], n_tokens [b])``; ``logp_sum / n_tokens`` is methods.md §5's ℓ(y).
        With context parallelism, all-reduce both over the CP group before dividing.
    """
    tok = token_logprobs(logits_local, labels, vocab_size=vocab_size, tp_group=tp_group,
                         chunk_tokens=chunk_tokens)
    keep = mask > 0
    return torch.where(keep, tok, torch.zeros_like(tok)).sum(-1), keep.sum(-1)
