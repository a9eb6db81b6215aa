"""GLD loss: co-activation graph on top-K logits, compared by a sorted 1-D W1 (SPEC §3).

Per sequence and per model, over the masked-in positions R with standardised top-K values a_t:
``ecc[u] = (1 / (|R| n)) sum_t a_t[u] S_t`` with ``S_t = sum_v a_t[v]`` -- the weighted degree of
node u in the graph ``C = (1/|R|) sum_t a_t a_t^T`` under the uniform node measure, computed by a
scatter-add over the top-K entries (the n x n graph is never formed). GLD is the exact 1-D
Wasserstein-1 distance between the student's and the teacher's node-value distributions (uniform
weights, node counts may differ): Mémoli's first lower bound of the GW_1 distance.

Vocab-parallel: the student's (values, ids) come from the distributed top-K and are identical on
every TP rank, so everything here is replicated, plain torch, no collective.
"""

from __future__ import annotations

import torch

from megatron_fusion.losses.topk import standardized_topk
from megatron_fusion.losses.uld import _check_reduction


def wasserstein_1d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact W1 between the uniform empirical distributions of ``x [n]`` and ``y [m]``.

    W1 = integral over q in (0,1) of |F_x^-1(q) - F_y^-1(q)|: merge the two quantile functions.
    Breakpoints are i/n and j/m; in integer units of 1/(n m) they are i*m and j*n, so the merge is
    exact (no float breakpoints that nearly coincide). O((n + m) log(n + m)).
    """
    n, m = x.numel(), y.numel()
    xs, ys = torch.sort(x).values, torch.sort(y).values
    dev = x.device
    ends = torch.unique(torch.cat([torch.arange(1, n + 1, device=dev) * m,
                                   torch.arange(1, m + 1, device=dev) * n]))  # sorted, last n*m
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    # interval (start, end] lies inside one cell of each quantile function
    diff = xs[starts // m] - ys[starts // n]
    return ((ends - starts).to(diff.dtype) * diff.abs()).sum() / (n * m)


def eccentricity(values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """Node eccentricities of each sequence's co-activation graph.

    Args: values ``[b, s, k]`` (float), ids ``[b, s, k]`` (int, distinct within a row),
        mask ``[b, s]``.
    Returns: ``ecc [n_total]`` grouped by sequence (nodes of sequence 0 first, each group sorted
        by id) and ``n_nodes [b]`` (0 for a sequence with no masked-in position).
    """
    b = values.shape[0]
    keep = mask > 0                                                    # [b, s]
    n_pos = keep.sum(-1)                                               # |R| per sequence, [b]
    row_sum = values.sum(-1, keepdim=True)                             # S_t, [b, s, 1]
    contrib = (values * row_sum)[keep]                                 # [P, k]
    node_ids = ids.long()[keep]                                        # [P, k]
    seq = torch.arange(b, device=values.device)[:, None].expand(keep.shape)[keep]   # [P]
    stride = int(node_ids.max()) + 1 if node_ids.numel() else 1
    node_key = seq[:, None] * stride + node_ids                         # one node per (seq, id)
    uniq, inverse = torch.unique(node_key, return_inverse=True)         # sorted by (seq, id)
    node_sum = contrib.new_zeros(uniq.numel()).index_add(0, inverse.flatten(), contrib.flatten())
    node_seq = uniq // stride
    n_nodes = torch.bincount(node_seq, minlength=b)
    ecc = node_sum / (n_pos[node_seq] * n_nodes[node_seq]).to(node_sum.dtype)
    return ecc, n_nodes


def gld_from_topk(student_values, student_ids, teacher_values, teacher_ids, mask):
    """Per-sequence GLD ``[b]`` from the two top-K lists (0 where a sequence has no position)."""
    ecc_s, n_s = eccentricity(student_values, student_ids, mask)
    ecc_t, n_t = eccentricity(teacher_values.to(student_values.dtype), teacher_ids, mask)
    out = []
    for es, et, ns, nt in zip(ecc_s.split(n_s.tolist()), ecc_t.split(n_t.tolist()),
                              n_s.tolist(), n_t.tolist()):
        out.append(wasserstein_1d(es, et) if ns and nt else es.sum() * 0.0)
    return torch.stack(out)


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
    _check_reduction(reduction)
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
