"""GLD loss: co-activation graph on top-K logits, compared by a sorted 1-D W1 (docs/methods.md §3).

Per sequence and per model, over the masked-in positions R with standardised top-K values a_t:
``ecc[u] = (1 / (|R| n)) sum_t a_t[u] S_t`` with ``S_t = sum_v a_t[v]`` -- the weighted degree of
node u in the graph ``C = (1/|R|) sum_t a_t a_t^T`` under the uniform node measure, computed by a
scatter-add over the top-K entries (the n x n graph is never formed). GLD is the exact 1-D
Wasserstein-1 distance between the student's and the teacher's node-value distributions (uniform
weights, node counts may differ): Mémoli's first lower bound of the GW_1 distance.

Batched: all sequences (and both models) at once, each padded to its s*k possible nodes, so every
shape is known on the host and nothing is read back from the device: no host sync and a fixed
number of kernels per call, whatever the batch size (tests/losses/test_losses_gld.py checks both).

Deterministic, forward and backward, on CUDA too: no op here sums with atomics. The per-node sum
is an accumulating ``index_put`` (on CUDA a stable radix sort of the indices, then each node's
entries summed in entry order by one thread; on CPU a serial loop), not ``index_add`` /
``scatter_add`` (atomic adds: the order of a node's additions varies from run to run). W1 reads
the quantile cells by advanced indexing, not ``gather``: the backward of ``gather`` is a
``scatter_add``, that of indexing the same sorted accumulating ``index_put``. The test checks the
op list of forward + backward for every atomic-add op.

Vocab-parallel: the student's (values, ids) come from the distributed top-K and are identical on
every TP rank, so everything here is replicated, plain torch, no collective.
"""

from __future__ import annotations

import torch

from megatron_fusion.losses.topk import standardized_topk
from megatron_fusion.losses.uld import check_reduction


# A node key is (row << 32) | id: one flat sort then orders every row's ids with the rows kept
# apart (each row stays in its own block of s*k sorted entries). Vocabulary ids are < 2**31 (int32
# on disk and on the wire); a masked-out entry gets the id part 2**32 - 1, after every id.
_ROW_SHIFT = 32
_NO_NODE = 2**32 - 1


def wasserstein_1d_batched(x: torch.Tensor, n: torch.Tensor, y: torch.Tensor,
                           m: torch.Tensor) -> torch.Tensor:
    """Exact W1 per row between uniform empirical distributions, padded rows, no host sync.

    Args: ``x [b, N]`` whose row r holds its ``n[r]`` values first (the rest is padding, ignored),
        ``y [b, M]`` likewise with ``m [b]`` (int tensors on x's device).
    Returns: ``[b]``, 0 (with zero gradient) where ``n`` or ``m`` is 0.

    W1 = integral over q in (0,1) of |F_x^-1(q) - F_y^-1(q)|: merge the two quantile functions.
    Breakpoints are i/n and j/m; in integer units of 1/(n m) they are i*m and j*n, so the merge is
    exact (no float breakpoints that nearly coincide). Both lists are arithmetic, so the merge needs
    no sort: a breakpoint's merged position is its rank in its own list plus the count of the other
    list's breakpoints before it, ``(i*m - 1) // n`` or ``(j*n) // m`` (a shared breakpoint: x's
    first, then a zero-length interval). Every shape is fixed by N and M, every count stays on the
    device: padding breakpoints go last, at n*m (zero-length intervals). O(N log N + M log M).
    """
    b, size_x = x.shape
    size_y = y.shape[1]
    dev = x.device
    valid_x = torch.arange(size_x, device=dev) < n[:, None]                 # [b, N]
    valid_y = torch.arange(size_y, device=dev) < m[:, None]                 # [b, M]
    # stable: tied values keep their input order (the gradient goes to the same tied element as
    # with a stable 1-D sort of the unpadded row); padding sorts last (+inf), then is zeroed so
    # that every gathered value is finite
    xs = torch.sort(torch.where(valid_x, x, float("inf")), dim=-1, stable=True).values
    ys = torch.sort(torch.where(valid_y, y, float("inf")), dim=-1, stable=True).values
    xs, ys = torch.where(valid_x, xs, 0.0), torch.where(valid_y, ys, 0.0)
    n1, m1 = n.clamp_min(1)[:, None], m.clamp_min(1)[:, None]   # [b, 1]; a row with n or m = 0: 0
    nm = n1 * m1
    i = torch.arange(1, size_x + 1, device=dev)                             # x's breakpoints i*m
    j = torch.arange(1, size_y + 1, device=dev)                             # y's breakpoints j*n
    pos_x = torch.where(valid_x, i - 1 + (i * m1 - 1) // n1, i - 1 + m[:, None])
    pos_y = torch.where(valid_y, j - 1 + (j * n1) // m1, size_x + j - 1)
    ends = torch.zeros(b, size_x + size_y, dtype=torch.long, device=dev)
    ends.scatter_(1, pos_x, torch.minimum(i * m1, nm)).scatter_(1, pos_y, torch.minimum(j * n1, nm))
    ends = ends * ((n > 0) & (m > 0))[:, None]                              # [b, N + M], last n*m
    starts = torch.nn.functional.pad(ends[:, :-1], (1, 0))
    # interval (start, end] lies inside one cell of each quantile function; zero-length intervals
    # may point past the valid cells, so clamp the cell index into the row
    ix = (starts // m1).clamp_max(size_x - 1)
    iy = (starts // n1).clamp_max(size_y - 1)
    # indexing, not gather: gather's backward is an atomic scatter_add on CUDA; indexing's is a
    # sorted accumulating index_put (deterministic), see the module docstring
    rows = torch.arange(b, device=dev)[:, None]                             # [b, 1]
    diff = xs[rows, ix] - ys[rows, iy]
    total = ((ends - starts).to(diff.dtype) * diff.abs()).sum(-1)
    # divide in float64: n*m is exact there (a bf16 n*m would round)
    return (total.double() / nm[:, 0]).to(diff.dtype)


def wasserstein_1d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact W1 between the uniform empirical distributions of ``x [n]`` and ``y [m]``."""
    n = torch.full((1,), x.numel(), device=x.device)
    m = torch.full((1,), y.numel(), device=x.device)
    return wasserstein_1d_batched(x.reshape(1, -1), n, y.reshape(1, -1), m)[0]


def eccentricity_padded(values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """Node eccentricities of each sequence's co-activation graph, padded, no host sync.

    Args: values ``[b, s, k]`` (float), ids ``[b, s, k]`` (int, distinct within a row),
        mask ``[b, s]``.
    Returns: ``ecc [b, s*k]`` (row r: its ``n_nodes[r]`` nodes sorted by id, then zeros) and
        ``n_nodes [b]`` (0 for a sequence with no masked-in position).

    A node is a distinct id of one sequence: sorting each row's ``s*k`` ids (masked-out
    entries keyed past every id) numbers them, and one accumulating index_put over all entries, in
    (sequence, position, slot) order, sums ``a_t[u] S_t`` per node -- the order of the unpadded
    scatter, so the sums round alike in any dtype, and (no atomics) alike from run to run on
    CUDA. Masked-out entries add 0 to a dump slot.
    """
    b, s, k = values.shape
    slots = s * k
    keep = mask > 0                                                    # [b, s]
    n_pos = keep.sum(-1)                                               # |R| per sequence, [b]
    # where, not a product: a masked-out position gets an exact-zero gradient even if its values
    # are not finite
    vals = torch.where(keep[..., None], values, 0.0)                   # [b, s, k]
    contrib = (vals * vals.sum(-1, keepdim=True)).flatten(1)           # a_t[u] S_t, [b, s*k]
    rows = torch.arange(b, device=values.device)                       # [b]
    key = torch.where(keep[..., None], ids.long(), _NO_NODE) + (rows << _ROW_SHIFT)[:, None, None]
    # one flat sort, not b row sorts: on CPU an int64 1-D sort is a radix sort (2x faster here); the
    # order among entries of one id does not matter, the sums below run in entry order
    key_sorted, order = torch.sort(key.flatten(), stable=True)          # [b*s*k]
    id_sorted = (key_sorted & _NO_NODE).view(b, slots)                  # row r: block r
    first = torch.ones_like(id_sorted, dtype=torch.bool)               # first entry of its node
    first[:, 1:] = id_sorted[:, 1:] != id_sorted[:, :-1]
    first &= id_sorted != _NO_NODE
    n_nodes = first.sum(-1)                                            # [b]
    node_sorted = torch.where(id_sorted != _NO_NODE, first.cumsum(-1) - 1, slots)  # dump: slots
    node_sorted = node_sorted + rows[:, None] * (slots + 1)            # index in [b*(slots+1)]
    flat = torch.empty_like(key_sorted).scatter_(0, order, node_sorted.flatten())  # entry order
    # accumulate=True: sorted, in entry order, no atomics (index_add would use atomics on CUDA)
    node_sum = contrib.new_zeros(b * (slots + 1)).index_put((flat,), contrib.flatten(),
                                                            accumulate=True)
    node_sum = node_sum.view(b, slots + 1)[:, :slots]                  # drop the dump slot
    ecc = node_sum / (n_pos * n_nodes).clamp_min(1).to(node_sum.dtype)[:, None]
    return ecc, n_nodes


def eccentricity(values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """Node eccentricities, flat: ``ecc [n_total]`` grouped by sequence (nodes of sequence 0
    first, each group sorted by id) and ``n_nodes [b]``. See ``eccentricity_padded``."""
    ecc, n_nodes = eccentricity_padded(values, ids, mask)
    # one host sync: the flat length is the number of distinct nodes, a device value (the loss
    # itself uses the padded layout and has none)
    return ecc[torch.arange(ecc.shape[1], device=ecc.device) < n_nodes[:, None]], n_nodes


def gld_from_topk(student_values, student_ids, teacher_values, teacher_ids, mask):
    """Per-sequence GLD ``[b]`` from the two top-K lists (0 where a sequence has no position).

    Batched over sequences and both models, fixed shapes, no host sync: a constant number of
    kernels whatever b (student rows 0..b-1, teacher rows b..2b-1 of one eccentricity batch)."""
    b = mask.shape[0]
    ecc, n_nodes = eccentricity_padded(
        torch.cat([student_values, teacher_values.to(student_values.dtype)]),
        torch.cat([student_ids.long(), teacher_ids.long()]), torch.cat([mask, mask]))
    return wasserstein_1d_batched(ecc[:b], n_nodes[:b], ecc[b:], n_nodes[b:])


def gld_loss(student_logits_local: torch.Tensor | None, teacher_topk_values: torch.Tensor,
             teacher_topk_ids: torch.Tensor, mask: torch.Tensor, *, k: int = 10,
             eps: float = 1e-6, vocab_size: int | None = None, tp_group=None,
             student_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
             reduction: str = "sum", chunk_tokens: int | None = None):
    """GLD loss, one graph per sequence, sum reduction.

    Args:
        student_logits_local: ``[b, s, v_local]`` student logits shard, or None with ``student_topk``.
        teacher_topk_values: ``[b, s, K]`` teacher standardised top-K values ``a_t``; K == k.
        teacher_topk_ids: ``[b, s, K]`` teacher-vocab ids of those values (int32/int64).
        mask: ``[b, s]`` 1 = aligned response position (a graph node source).
        student_topk: precomputed ``standardized_topk(...)`` output to share with ULD.
        reduction: ``"sum"`` or ``"sequence"`` (per-sequence ``[b]`` values and 0/1 counts).
    Returns:
        ``(loss_sum, count)``: sum of per-sequence W1 and the number of sequences with at least
        one masked-in position. All masked -> ``(0, 0)`` with zero gradients.
    """
    check_reduction(reduction)
    if teacher_topk_values.dim() != 3 or teacher_topk_ids.shape != teacher_topk_values.shape:
        raise ValueError(f"gld_loss: teacher values {tuple(teacher_topk_values.shape)} and ids "
                         f"{tuple(teacher_topk_ids.shape)} must both be [b, s, K]")
    if teacher_topk_values.shape[-1] != k:
        raise ValueError(f"gld_loss: teacher top-K has K={teacher_topk_values.shape[-1]} but k={k}")
    if mask.shape != teacher_topk_values.shape[:2]:
        raise ValueError(f"gld_loss: mask {tuple(mask.shape)} does not match teacher "
                         f"[b, s] = {tuple(teacher_topk_values.shape[:2])}")
    if student_topk is None:
        if student_logits_local is None:
            raise ValueError("gld_loss: give student_logits_local or student_topk")
        if student_logits_local.shape[:2] != mask.shape:
            raise ValueError(f"gld_loss: student logits {tuple(student_logits_local.shape)} do not "
                             f"match mask {tuple(mask.shape)}")
        student_topk = standardized_topk(student_logits_local, k, eps=eps, vocab_size=vocab_size,
                                         tp_group=tp_group, chunk_tokens=chunk_tokens)
    s_values, s_ids = student_topk
    if s_values.shape != teacher_topk_values.shape:
        raise ValueError(f"gld_loss: student top-K {tuple(s_values.shape)} does not match teacher "
                         f"{tuple(teacher_topk_values.shape)}")
    per_seq = gld_from_topk(s_values, s_ids, teacher_topk_values, teacher_topk_ids, mask)
    has_pos = (mask > 0).any(-1)                                        # [b]
    if reduction == "sequence":
        return per_seq, has_pos.long()
    return per_seq.sum(), has_pos.sum()
