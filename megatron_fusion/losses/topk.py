"""Global top-K over TP vocab shards, raw or z-scored (docs/methods.md §2), in one autograd.Function.

Forward, per token (b*s tokens, ``N`` below):
  1. each rank picks its local top-K candidates over its *real* columns (padding excluded);
  2. ONE all-gather of ``K`` candidates per rank (``K*tp`` per token) and a re-selection of the
     global top-K, descending, ties to the lower global id;
  3. ``standardized_topk`` also needs the per-token mean and population std over the true vocab:
     each shard sums ``z - c`` and ``(z - c)^2`` in fp32 with a shift ``c`` taken from the row (so
     the squares do not cancel), in the same sweep as the candidates; these become float64 moments
     ``[sum z, sum z^2]`` and ONE all-reduce of these two scalars per token combines the shards.
     In float64, ``E[z^2] - mu^2`` loses only ~1e-16 * (mu / sigma)^2 relative.

Because z-scoring is a positive affine map per token, the top-K of ``(z - mu) / (sigma + eps)`` is
the top-K of ``z``; only the returned values are transformed.

The sweep pieces (``LocalCandidates``, ``shifted_moments``, ``zscore_stats``, ``zscore_grad_terms``)
are shared with ``ce_topk.py``, which computes the same top-K together with the pivot CE in one
Function (one shard-sized gradient for both).

Every TP rank ends with the same replicated (values, ids), so the loss built on them is replicated
too and its gradient w.r.t. the values is the same on every rank: the backward needs no
communication. Each rank scatters the entries whose ids it owns and, for the z-score, adds the
dense term through mu and sigma, which needs only per-token ``sum(g)`` and ``sum(g * a)``.

fp32 path (bf16/fp16/fp32 inputs): the local top-K is ``torch.topk`` on the chunk in its own dtype
(rows whose k-th value ties with a left-out column get the lowest tied ids; one host sync per call). A candidate travels packed into one int64 *sort
key* ``(order-preserving int32 of the fp32 value) << 32 | (2^32 - 1 - id)``: the all-gather moves
8 bytes per candidate (4 value + 4 id) in one tensor, and one ``topk`` on the ``k*tp`` keys gives
"value descending, then id ascending" exactly. fp64 inputs (gradcheck) take an equivalent path with a
stable sort and (value, id) pairs packed as float64.
"""

from __future__ import annotations

import torch

from megatron_fusion.losses._shard import (
    ShardLayout, all_gather_rows, all_reduce_, compute_dtype, owned_columns, shard_layout,
    token_chunks,
)

_LOW32 = (1 << 32) - 1
_MAG31 = 0x7FFFFFFF
_SENTINEL_KEY = torch.iinfo(torch.int64).min   # pads a rank's candidate list; never selected
_SENTINEL_ID = float(1 << 52)                  # same role on the fp64 path (exact in float64)


# ---------------------------------------------------------------- sort keys (fp32 path)
def encode_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 values + int64 ids (< 2^32) -> int64 keys ordered by (value desc, id asc)."""
    bits = values.view(torch.int32).to(torch.int64)          # sign-extended IEEE bits
    sign = bits >> 63                                         # -1 for negative floats, else 0
    # negative floats: flip the magnitude bits so that larger magnitude sorts lower; the "+1"
    # (i.e. "- sign") maps -0.0 onto +0.0 so the two zeros tie and fall back to the id order.
    ordered = (bits ^ (sign & _MAG31)) - sign
    return (ordered << 32) + (_LOW32 - ids)


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = keys >> 32
    ids = _LOW32 - (keys & _LOW32)
    bits = torch.where(ordered < 0, (ordered - 1) ^ _MAG31, ordered)
    return bits.to(torch.int32).view(torch.float32), ids


def _topk_with_margin(xc: torch.Tensor, kk: int):
    """Local top-kk of ``xc [n, c]`` (bf16/fp16/fp32, no fp32 copy) and a per-row flag.

    ``torch.topk`` returns the right *values*, but when the kk-th value ties with a column it left
    out, which tied columns it kept is implementation-defined. One extra entry tells: the row is
    ambiguous iff the (kk+1)-th value equals the kk-th. Ambiguous rows (frequent in bf16, whose
    coarse grid makes equal logits common; all over integer test logits) are fixed afterwards
    (``_lowest_tied_columns``).
    """
    take = min(kk + 1, xc.shape[1])
    vals, idx = xc.topk(take, dim=-1, sorted=True)
    if take > kk:
        ambiguous = vals[:, kk] == vals[:, kk - 1]
        vals, idx = vals[:, :kk], idx[:, :kk]
    else:                                   # every column is selected: nothing left out
        ambiguous = torch.zeros(xc.shape[0], dtype=torch.bool, device=xc.device)
    return vals.float(), idx, ambiguous


def _lowest_tied_columns(xr: torch.Tensor, vals: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Fix ambiguous rows: the kk-th value ``tau`` ties with left-out columns.

    xr ``[m, c]`` the rows (own dtype), vals ``[m, kk]`` their top values (fp32, descending, exact),
    cols ``[m, kk]`` the columns topk picked. The entries above ``tau`` are right; the last ``r``
    slots (value ``tau``) must hold the ``r`` LOWEST columns equal to ``tau``. Found with one
    comparison and an int32 topk of ``(c - column)`` over the tied columns: no int64 temporaries.
    """
    m, kk = vals.shape
    n_cols = xr.shape[1]
    tau = vals[:, -1:]
    tied = xr == tau.to(xr.dtype)                       # exact: tau is one of the row's values
    rank_key = torch.arange(n_cols, 0, -1, dtype=torch.int32, device=xr.device)   # c - column
    lowest = n_cols - torch.where(tied, rank_key, 0).topk(kk, dim=-1, sorted=True).values.long()
    first_tied = kk - (vals == tau).sum(-1, keepdim=True)          # slots [first_tied, kk) hold tau
    j = torch.arange(kk, device=xr.device)
    from_lowest = lowest.gather(1, (j - first_tied).clamp_min(0))
    return torch.where(j >= first_tied, from_lowest, cols)


def _merge_keys(gathered: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gathered: [tp, N, k] keys -> global (values fp32 [N, k], ids int64 [N, k]), descending."""
    cand = gathered.permute(1, 0, 2).reshape(gathered.shape[1], -1)   # [N, tp*k]
    return decode_keys(cand.topk(k, dim=-1, sorted=True).values)


# ---------------------------------------------------------------- fp64 path (tests, gradcheck)
def _local_pairs_f64(x: torch.Tensor, k: int, lay: ShardLayout) -> torch.Tensor:
    """x: [n, n_valid] float64 -> [n, k, 2] (value, id) candidates; stable sort = lower id first."""
    n = x.shape[0]
    out = torch.empty((n, k, 2), dtype=torch.float64, device=x.device)
    out[..., 0] = -torch.inf
    out[..., 1] = _SENTINEL_ID
    kk = min(k, lay.n_valid)
    if kk > 0:
        vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
        out[:, :kk, 0] = vals[:, :kk]
        out[:, :kk, 1] = (idx[:, :kk] + lay.start).double()
    return out


def _merge_pairs_f64(gathered: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    cand = gathered.permute(1, 0, 2, 3).reshape(gathered.shape[1], -1, 2)   # [N, tp*k, 2]
    vals, ids = cand[..., 0], cand[..., 1]
    by_id = ids.argsort(dim=-1, stable=True)                  # secondary key first ...
    vals, ids = vals.gather(1, by_id), ids.gather(1, by_id)
    by_val = vals.argsort(dim=-1, descending=True, stable=True)[:, :k]   # ... then primary
    return vals.gather(1, by_val), ids.gather(1, by_val).long()


# ---------------------------------------------------------------- shared sweep helpers
# Used by _VocabParallelTopK below and by the fused CE + top-K Function (ce_topk.py): the local
# candidates, the shifted moments and the backward coefficients are the same math in both.
class LocalCandidates:
    """This rank's top-K candidates for every token, filled one chunk at a time during the sweep,
    then merged into the global top-K with ONE all-gather (:meth:`merge`)."""

    def __init__(self, n_tok: int, k: int, lay: ShardLayout, cdt: torch.dtype, device):
        self.k, self.lay = k, lay
        self.kk = min(k, lay.n_valid)                        # k may exceed the shard
        self.f64 = cdt == torch.float64
        if self.f64:
            self.pairs = torch.empty((n_tok, k, 2), dtype=torch.float64, device=device)
        else:
            self.vals = torch.empty((n_tok, self.kk), dtype=torch.float32, device=device)
            self.cols = torch.empty((n_tok, self.kk), dtype=torch.int64, device=device)
            self.ambiguous = torch.zeros(n_tok, dtype=torch.bool, device=device)

    def add(self, sl: slice, xc: torch.Tensor) -> torch.Tensor:
        """xc = ``x[sl, :n_valid]``, the chunk's real columns in the logits' own dtype.
        Returns the chunk's row maxima ``[n]`` in the compute dtype (exact; -inf without columns),
        which the fused CE reuses instead of a separate max pass."""
        if self.f64:
            self.pairs[sl] = _local_pairs_f64(xc, self.k, self.lay)
            return self.pairs[sl, 0, 0]
        if self.kk > 0:
            self.vals[sl], self.cols[sl], self.ambiguous[sl] = _topk_with_margin(xc, self.kk)
            return self.vals[sl, 0]
        return torch.full((xc.shape[0],), -torch.inf, device=xc.device)

    def merge(self, x: torch.Tensor, chunk_tokens: int | None):
        """x: ``[N, v_local]`` the shard (to fix boundary ties) -> global (values [N, k] in the
        compute dtype, raw logits, descending; ids [N, k] int64). The one all-gather of k*tp."""
        lay, k = self.lay, self.k
        if self.f64:
            cands = self.pairs
        else:
            rows = self.ambiguous.nonzero()[:, 0]                 # one host sync per forward
            nv = lay.n_valid
            for rs in token_chunks(rows.numel(), lay.v_local, chunk_tokens, x.device):
                r = rows[rs]
                self.cols[r] = _lowest_tied_columns(x[r, :nv], self.vals[r], self.cols[r])
            cands = torch.full((x.shape[0], k), _SENTINEL_KEY, dtype=torch.int64, device=x.device)
            if self.kk > 0:
                cands[:, :self.kk] = encode_keys(self.vals, self.cols + lay.start)
        gathered = all_gather_rows(cands, lay)                   # the one all-gather of k*tp
        return (_merge_pairs_f64 if self.f64 else _merge_keys)(gathered, k)


def shifted_moments(xc: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """xc ``[n, c]`` (c >= 1 real columns, own dtype) -> float64 ``[n, 2]`` = [sum z, sum z^2].

    The sums run in the compute dtype on ``z - c`` with the shift c = the row's first real logit
    (a sample of the row, so sum (z - c)^2 does not cancel the way sum z^2 - V mu^2 would in
    fp32); the shift is undone in float64.
    """
    nv = xc.shape[1]
    c = xc[:, :1].to(cdt)
    d = torch.sub(xc, c)                                   # fp32 (promotion), one pass
    s1 = d.sum(-1).double()
    s2 = d.square_().sum(-1).double()                      # in place: no second temporary
    c = c[:, 0].double()
    return torch.stack([nv * c + s1, s2 + 2 * c * s1 + nv * c * c], dim=-1)


def zscore_stats(moments: torch.Tensor, vocab_size: int, cdt: torch.dtype):
    """All-reduced float64 moments [N, 2] -> (mu, population sigma) [N] in the compute dtype."""
    mu64 = moments[:, 0] / vocab_size
    var64 = (moments[:, 1] / vocab_size - mu64 * mu64).clamp_min(0.0)
    return mu64.to(cdt), var64.sqrt().to(cdt)


def zscore_grad_terms(g: torch.Tensor, values: torch.Tensor, mu: torch.Tensor,
                      sigma: torch.Tensor, eps: float, vocab_size: int):
    """Backward of ``a = (z_ids - mu) / (sigma + eps)`` for incoming ``g = dL/da`` [N, k].

    dL/dz_j = [scatter g / d]_j - sum(g) / (V d) - sum(g a) (z_j - mu) / (V sigma d), d = sigma + eps,
    returned as (scatter source ``g / d`` [N, k], ``bias`` [N], ``slope`` [N]) with the dense part
    ``bias + slope * z_j`` (one addcmul per chunk).
    """
    d = sigma + eps                                                  # [N]
    c0 = g.sum(-1) / (vocab_size * d)
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    c1 = torch.where(sigma > 0, (g * values).sum(-1) / (vocab_size * safe_sigma * d),
                     torch.zeros_like(sigma))                        # sigma = 0: z_j - mu = 0 anyway
    # -c0 - c1 (z - mu) = (c1 mu - c0) + z * (-c1)
    return g / d[:, None], c1 * mu - c0, -c1


def flat_shard(logits_local: torch.Tensor, k: int, vocab_size, tp_group):
    """(layout, leading shape, logits as an [N, v_local] view), after checking ``k``."""
    lay = shard_layout(logits_local, vocab_size, tp_group)
    if not 0 < k <= lay.vocab_size:
        raise ValueError(f"top-K: k={k} must be in [1, vocab_size={lay.vocab_size}]")
    return lay, logits_local.shape[:-1], logits_local.reshape(-1, lay.v_local)


# ---------------------------------------------------------------- the autograd.Function
class _VocabParallelTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_local, k, vocab_size, tp_group, standardize, eps, chunk_tokens):
        lay, lead, x = flat_shard(logits_local, k, vocab_size, tp_group)   # x [N, v_local]
        n_tok, nv = x.shape[0], lay.n_valid
        cdt = compute_dtype(logits_local.dtype)
        dev = x.device
        cands = LocalCandidates(n_tok, k, lay, cdt, dev)
        # per token: [sum z, sum z^2] of this shard, in float64 (see the module docstring)
        moments = torch.zeros((n_tok, 2), dtype=torch.float64, device=dev)
        # one sweep over the shard, a chunk of tokens at a time (fp32 temporaries of one chunk)
        for sl in token_chunks(n_tok, lay.v_local, chunk_tokens, dev):
            xc = x[sl, :nv]
            cands.add(sl, xc)
            if standardize and nv > 0:
                moments[sl] = shifted_moments(xc, cdt)
        if standardize:
            all_reduce_(moments, lay)                          # the one all-reduce (2 scalars)
            mu, sigma = zscore_stats(moments, lay.vocab_size, cdt)
        values, ids = cands.merge(x, chunk_tokens)            # the one all-gather of k*tp
        values = values.to(cdt)
        if standardize:
            values = (values - mu[:, None]) / (sigma[:, None] + eps)
            ctx.save_for_backward(logits_local, ids, values, mu, sigma)
        else:
            ctx.save_for_backward(ids)
        ctx.lay, ctx.standardize, ctx.eps, ctx.chunk_tokens = lay, standardize, eps, chunk_tokens
        ctx.shape, ctx.dtype, ctx.device = logits_local.shape, logits_local.dtype, logits_local.device
        ctx.mark_non_differentiable(ids)
        return values.view(*lead, k), ids.view(*lead, k)

    @staticmethod
    def backward(ctx, grad_values, _grad_ids):
        lay: ShardLayout = ctx.lay
        nv = lay.n_valid
        if grad_values is None or nv == 0 or not ctx.standardize:
            grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        else:   # every real column is written below: only the padding needs zeroing
            grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device)
            grad[..., nv:] = 0
        if grad_values is None or nv == 0:                     # a padding-only shard: all zero
            return grad, None, None, None, None, None, None
        grad2 = grad.view(-1, lay.v_local)
        cdt = compute_dtype(ctx.dtype)
        if ctx.standardize:
            x_all, ids, values, mu, sigma = ctx.saved_tensors
            x = x_all.reshape(-1, lay.v_local)
        else:
            (ids,) = ctx.saved_tensors
        g = grad_values.reshape(ids.shape).to(cdt)              # [N, k], same on every TP rank
        col, owned = owned_columns(ids, lay)
        if not ctx.standardize:
            src = torch.where(owned, g, torch.zeros_like(g)).to(ctx.dtype)
            grad2.scatter_add_(1, col, src)
            return grad, None, None, None, None, None, None
        src, bias, slope = zscore_grad_terms(g, values, mu, sigma, ctx.eps, lay.vocab_size)
        src = torch.where(owned, src, torch.zeros_like(src))
        direct = ctx.dtype == cdt                                # fp32/fp64: write in place
        for sl in token_chunks(ids.shape[0], lay.v_local, ctx.chunk_tokens, ctx.device):
            gc = grad2[sl, :nv] if direct else torch.empty(
                (sl.stop - sl.start, nv), dtype=cdt, device=ctx.device)
            torch.addcmul(bias[sl, None], x[sl, :nv], slope[sl, None], out=gc)   # fp32 math
            gc.scatter_add_(1, col[sl], src[sl])
            if not direct:
                grad2[sl, :nv] = gc
        return grad, None, None, None, None, None, None


def distributed_topk(logits_local: torch.Tensor, k: int, *, vocab_size: int | None = None,
                     tp_group=None, chunk_tokens: int | None = None):
    """Global top-K of the vocab-parallel logits.

    Args:
        logits_local: ``[b, s, v_local]`` this TP rank's shard (any float dtype; any leading dims).
        k: number of entries; may exceed ``v_local`` (must be <= vocab_size).
        vocab_size: true vocabulary size; columns ``>= vocab_size`` are padding, never selected.
        tp_group: the TP process group, or None for a single shard holding the whole vocab.
        chunk_tokens: tokens per chunk of the local work (default: ~8M logits per chunk).
    Returns:
        values ``[b, s, k]`` (fp32, fp64 for fp64 input; differentiable, identical on all TP ranks),
        ids ``[b, s, k]`` int64 global vocab ids; descending, ties to the lower id.
    Communication: one all-gather of ``k`` int64 keys per token per rank; backward none.
    """
    return _VocabParallelTopK.apply(logits_local, k, vocab_size, tp_group, False, 0.0, chunk_tokens)


def standardized_topk(logits_local: torch.Tensor, k: int, *, eps: float = 1e-6,
                      vocab_size: int | None = None, tp_group=None,
                      chunk_tokens: int | None = None):
    """Top-K of the full-vocabulary z-scored logits ``(z - mu) / (sigma + eps)`` (docs/methods.md §2).

    ``mu`` and the population ``sigma`` are over the true vocabulary (padding excluded); the
    gradient flows through the selected entries *and* through ``mu`` and ``sigma``.
    Shapes and arguments as :func:`distributed_topk`. Communication: one all-reduce of two
    scalars per token (float64 moments) plus the top-K all-gather; backward none.
    """
    return _VocabParallelTopK.apply(logits_local, k, vocab_size, tp_group, True, eps, chunk_tokens)
