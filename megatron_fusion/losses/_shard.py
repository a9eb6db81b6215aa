"""Shared helpers for the vocab-parallel losses: shard layout, token chunks, collectives.

The student's logits arrive as this TP rank's vocab shard ``[b, s, v_local]`` in Megatron's
VocabUtility layout: rank r holds global columns ``[r * v_local, (r + 1) * v_local)``. Megatron
pads the vocabulary to a multiple of ``tp * 128``; columns ``>= vocab_size`` are padding and never
count (not in a top-K, not in a mean, not in a softmax) and always get a zero gradient.

``tp_group=None`` means "no tensor parallelism": the shard *is* the full (padded) vocabulary and no
collective is issued. That is the serial reference path the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

# Work on at most this many logits elements at a time (a chunk of tokens), so the fp32 temporaries
# of a bf16 shard are one chunk, not a whole-shard copy. On a CPU a chunk that stays in cache
# (4 MiB fp32) is also faster; on a GPU large chunks (64 MiB fp32) keep kernels bandwidth-bound.
CHUNK_ELEMENTS_CPU = 1 << 20
CHUNK_ELEMENTS_GPU = 1 << 24


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's vocab shard sits in the global (padded) vocabulary."""

    tp_rank: int
    tp_size: int
    v_local: int      # columns on this rank, padding included
    start: int        # global id of local column 0
    n_valid: int      # local columns that are real vocabulary (the rest is padding), may be 0
    vocab_size: int   # true vocabulary size over all ranks
    group: object     # the TP group, or None when tp_size == 1


def shard_layout(logits_local: torch.Tensor, vocab_size: int | None, tp_group) -> ShardLayout:
    v_local = logits_local.shape[-1]
    if tp_group is None:
        tp_rank, tp_size = 0, 1
    else:
        tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    padded = v_local * tp_size
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, v_local*tp = {padded}]")
    start = tp_rank * v_local
    n_valid = max(0, min(v_local, vocab_size - start))
    return ShardLayout(tp_rank, tp_size, v_local, start, n_valid, vocab_size,
                       tp_group if tp_size > 1 else None)


def owned_columns(ids: torch.Tensor, lay: ShardLayout):
    """Global ids -> (local column, owned): entries other ranks own point at column 0 (their
    scatter source is zeroed, which keeps the scatter dense)."""
    local = ids - lay.start
    owned = (local >= 0) & (local < lay.n_valid)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math dtype: fp32 for bf16/fp16/fp32 inputs, fp64 kept (gradcheck and tight references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_chunks(n_tokens: int, v_local: int, chunk_tokens: int | None,
                 device: torch.device | None = None) -> Iterator[slice]:
    """Slices of at most ``chunk_tokens`` tokens (default: a fixed element budget per chunk)."""
    if chunk_tokens is None:
        budget = CHUNK_ELEMENTS_GPU if device is not None and device.type == "cuda" \
            else CHUNK_ELEMENTS_CPU
        chunk_tokens = max(1, budget // max(1, v_local))
    for lo in range(0, n_tokens, chunk_tokens):
        yield slice(lo, min(n_tokens, lo + chunk_tokens))


def all_reduce_(t: torch.Tensor, lay: ShardLayout, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if lay.group is not None:
        dist.all_reduce(t, op=op, group=lay.group)
    return t


def all_gather_rows(t: torch.Tensor, lay: ShardLayout) -> torch.Tensor:
    """[n, ...] on each rank -> [tp, n, ...] (one collective)."""
    t = t.contiguous()
    if lay.group is None:
        return t.unsqueeze(0)
    out = t.new_empty((lay.tp_size * t.shape[0],) + tuple(t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=lay.group)
    return out.view((lay.tp_size,) + tuple(t.shape))
