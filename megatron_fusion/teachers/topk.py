"""A teacher's standardised top-K at the pivot's positions, for one batch of pivot samples.

For every pivot sample the teacher encodes the *same text segments* with its own tokenizer
(``megatron_fusion.data.sft.encode_segments``), runs a forward pass, takes the standardised top-K
of its logits with the student's own ``standardized_topk`` (distributed over the teacher's vocab
shards when its backend is tensor-parallel), and the rows of the aligned teacher positions are
placed at the pivot positions (``megatron_fusion.teachers.align``). Only pivot positions whose
label is a response token are kept (``aligned_mask`` = aligned AND response). The same forward
pass gives each sample's teacher cross-entropy on the gold response over the teacher's *own*
tokens (``token_logprobs``, vocab-parallel): position j predicting token j+1 counts when token j+1
is a response token of the teacher's encoding and ends inside the text the pivot's labels cover
(a truncated pivot sample limits it). The summed NLL is kept per teacher token (``teacher_ce``)
and per UTF-8 byte of the response text those tokens cover (``teacher_ce_byte``, the union of
their character spans): the minCE / avgCE weights compare the per-byte number, which does not
depend on how finely a tokenizer splits the text (docs/methods.md §2).

The same forward also gives the teacher's log-probs at its top-K ids over its full vocabulary and
the z-score scalars ``d = sigma + eps``, ``c = mu - logsumexp`` (``teachers.logprobs.
topk_logprob_stats``, vocab-parallel): what format-4 shards and the online wire store.

Device: the forward, top-K, log-probs and the placement at pivot positions run on the logits'
device; ONE host copy per batch (``to_host``) brings values, ids, masks, log-probs and CE sums
back. Used by the offline precompute (``teachers.precompute``) and by online teachers
(``teachers.online``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from megatron_fusion.data.sft import encode_segments
from megatron_fusion.errors import TeacherDataError
from megatron_fusion.teachers.align import mined_alignment, next_aligned, offset_alignment
from megatron_fusion.teachers.backends import TeacherBackend, true_vocab_size


@dataclass
class SampleTopK:
    """One sample's teacher top-K at pivot positions."""

    sample_id: int
    values: torch.Tensor        # [P, K] float32 (standardised logits), 0 where not aligned
    ids: torch.Tensor           # [P, K] int64 teacher ids
    aligned_mask: torch.Tensor  # [P] bool: aligned AND labels[t] is a response token
    n_response: int             # response positions (loss_mask = 1) among the P
    teacher_tokens: int
    teacher_ce: float = float("nan")  # mean NLL (nats/token) over the teacher's response tokens
    teacher_ce_tokens: int = 0        # teacher tokens (predicted, response) the mean is over
    teacher_ce_byte: float = float("nan")  # the same NLL sum per byte of text (nats/byte)
    teacher_ce_bytes: int = 0         # UTF-8 bytes of response text those tokens cover
    # the teacher's log-probs at its top-K ids over its full vocabulary (float64, 0 where not
    # aligned) and the z-score scalars d = sigma + eps, c = mu - logsumexp [P] (methods.md §6)
    logp: torch.Tensor | None = None  # [P, K]
    d: torch.Tensor | None = None     # [P]
    c: torch.Tensor | None = None     # [P]


def teacher_inputs(sample, teacher_tokenizer, pivot_positions: int,
                   max_teacher_len: int | None = None, *, with_labels: bool = False):
    """Teacher ids/offsets for a pivot sample, cut where they stop mattering (causal model):
    after the last pivot position's context end, or at ``max_teacher_len``.

    ``with_labels``: also return the teacher's next-token labels and their response flags,
    ``labels[j] = ids[j + 1]`` for the n inputs (n - 1 of them, or n when the teacher token after
    the cut still ends inside the text the pivot's labels cover). The teacher CE is taken over
    the labels flagged as response: the gold response as far as the pivot's window reaches.
    """
    return _teacher_inputs(sample, teacher_tokenizer, pivot_positions, max_teacher_len,
                           with_labels)[:4 if with_labels else 2]


def _teacher_inputs(sample, teacher_tokenizer, pivot_positions, max_teacher_len, with_labels):
    """``teacher_inputs`` plus the labels' character offsets and the sample's text."""
    ids, offs, is_resp, text = encode_segments(teacher_tokenizer, sample.segments)
    c_max = int(sample.offsets[pivot_positions - 1][1]) if pivot_positions else 0
    n = 0
    while n < len(ids) and offs[n][1] <= c_max:
        n += 1
    if max_teacher_len is not None:
        n = min(n, max_teacher_len)
    if not with_labels:
        return ids[:n], offs[:n], None, None, None, text
    # the pivot's last label is token P (when the sample goes on past its P positions)
    l_max = (int(sample.offsets[pivot_positions][1]) if pivot_positions < len(sample.ids)
             else c_max)
    m = n + 1 if 0 < n < len(ids) and offs[n][1] <= l_max else n
    return ids[:n], offs[:n], ids[1:m], is_resp[1:m], offs[1:m], text


def covered_bytes(text: str, spans, flags) -> int:
    """UTF-8 bytes of ``text`` in the union of the flagged character spans (in text order;
    overlapping spans, e.g. byte-fallback pieces of one character, count once)."""
    n, end = 0, 0
    for (a, b), f in zip(spans, flags):
        if f and b > max(a, end):
            n += len(text[max(a, end):b].encode("utf-8"))
            end = b
    return n


def align_sample(sample, t_ids, t_offs, pivot_tokenizer, teacher_tokenizer, pivot_positions: int,
                 method: str = "offset") -> list[int]:
    p_offs = sample.offsets[:pivot_positions].tolist()
    if method == "offset":
        return offset_alignment(p_offs, t_offs)
    if method == "offset_next":
        return next_aligned(offset_alignment(p_offs, t_offs))
    if method == "mined":
        p_pieces = [pivot_tokenizer.id_to_piece(int(i)) for i in sample.ids[:pivot_positions]]
        return mined_alignment(p_pieces, [teacher_tokenizer.id_to_piece(int(i)) for i in t_ids])
    raise ValueError(f"alignment must be 'offset', 'offset_next' or 'mined', got {method!r}")


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """ONE device-to-host copy for several tensors (any devices, shapes, dtypes): packed into one
    float64 buffer, which holds fp32/bf16/fp16/fp64 values, bools and integers below 2^53 exactly
    (vocab ids, counts). Returns CPU tensors of the original shapes and dtypes."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors])       # [sum numel] on the device
    host = flat.cpu()                                                  # the one copy
    out, o = [], 0
    for t in tensors:
        out.append(host[o:o + t.numel()].view(t.shape).to(t.dtype))
        o += t.numel()
    return out


def compute_batch_topk(samples, backend: TeacherBackend, teacher_tokenizer, pivot_tokenizer,
                       seq_len: int, *, k: int, eps: float, alignment: str,
                       max_teacher_len: int | None) -> list[SampleTopK]:
    """Teacher forward on a right-padded batch, standardised top-K placed at pivot positions, and
    each sample's teacher CE on its own response tokens (``SampleTopK.teacher_ce``, per token;
    ``teacher_ce_byte``, per byte of the text they cover).

    Tokenisation and the alignment maps are host work; the forward, the top-K, the log-probs and
    the placement at pivot positions run on the logits' device, and the results come back to the
    host in ONE copy per batch (values, ids, masks, log-probs, d, c and CE sums together)."""
    # the student's own functions (docs/methods.md §2): top-K and vocab-parallel log-softmax
    from megatron_fusion.losses import standardized_topk, token_logprobs
    from megatron_fusion.teachers.logprobs import topk_logprob_stats

    vocab = true_vocab_size(backend, teacher_tokenizer)
    prepared = []
    for s in samples:
        P = min(len(s.ids), seq_len)                       # pivot positions (tokens) of the sample
        t_ids, t_offs, t_labels, t_resp, l_offs, text = _teacher_inputs(
            s, teacher_tokenizer, P, max_teacher_len, True)
        align = align_sample(s, t_ids, t_offs, pivot_tokenizer, teacher_tokenizer, P, alignment)
        n_bytes = covered_bytes(text, l_offs, t_resp)
        prepared.append((s, P, t_ids, (t_labels, t_resp), align, n_bytes))
    b, T = len(prepared), max(1, max(len(p[2]) for p in prepared))
    P_max = max(p[1] for p in prepared)
    pad = teacher_tokenizer.pad_id if teacher_tokenizer.pad_id is not None else (
        teacher_tokenizer.eos_id or 0)
    # host inputs, built from Python lists and moved to the device once each
    batch = torch.full((b, T), pad, dtype=torch.long)               # [b, T], right padding
    labels = torch.full((b, T), pad, dtype=torch.long)              # [b, T]: teacher token j+1
    ce_mask = torch.zeros(b, T, dtype=torch.bool)                   # j predicts a response token
    src = torch.full((b, P_max), -1, dtype=torch.long)              # [b, P]: teacher pos or -1
    resp = torch.zeros(b, P_max, dtype=torch.bool)                  # [b, P]: labels[t] is response
    for r, (s, P, t_ids, (t_labels, t_resp), align, _) in enumerate(prepared):
        batch[r, :len(t_ids)] = torch.as_tensor(t_ids, dtype=torch.long)
        labels[r, :len(t_labels)] = torch.as_tensor(t_labels, dtype=torch.long)
        ce_mask[r, :len(t_resp)] = torch.as_tensor(t_resp, dtype=torch.bool)
        src[r, :P] = torch.as_tensor(align, dtype=torch.long)
        nxt = torch.as_tensor(s.is_response[1:P + 1], dtype=torch.bool)
        resp[r, :len(nxt)] = nxt
    with torch.no_grad():
        logits = backend.local_logits(batch)                        # [b, T, v/tp] on the device
        dev = logits.device
        values, ids = standardized_topk(logits, k, eps=eps, vocab_size=vocab,
                                        tp_group=backend.tp_group)  # [b, T, K] x2
        logp = token_logprobs(logits, labels.to(dev, non_blocking=True), vocab_size=vocab,
                              tp_group=backend.tp_group)            # [b, T], same on all TP ranks
        # the top-K's log-probs and d, c (float64, [b, T, K] / [b, T]): methods.md §6
        t_lp, t_d, t_c = topk_logprob_stats(logits, ids, eps=eps, vocab_size=vocab,
                                            tp_group=backend.tp_group)
        del logits
        src_d, resp_d = src.to(dev, non_blocking=True), resp.to(dev, non_blocking=True)
        mask = (src_d >= 0) & resp_d                                # [b, P]: aligned AND response
        rows = src_d.clamp(min=0)[..., None].expand(-1, -1, k)      # [b, P, K]
        v = torch.where(mask[..., None], values.gather(1, rows).float(), 0.0)   # [b, P, K]
        i = torch.where(mask[..., None], ids.gather(1, rows), 0)                # [b, P, K]
        lp = torch.where(mask[..., None], t_lp.gather(1, rows), 0.0)            # [b, P, K]
        pos = src_d.clamp(min=0)                                                # [b, P]
        dd = torch.where(mask, t_d.gather(1, pos), 0.0)                         # [b, P]
        cc = torch.where(mask, t_c.gather(1, pos), 0.0)                         # [b, P]
        nll_sum = torch.where(ce_mask.to(dev, non_blocking=True), -logp.double(),
                              0.0).sum(-1)                          # [b]
        v, i, mask, nll_sum, lp, dd, cc = to_host(v, i, mask, nll_sum, lp, dd, cc)  # one copy
    n_ce = ce_mask.sum(-1)                                          # [b] (host input)
    out = []
    for r, (s, P, t_ids, _, _, n_bytes) in enumerate(prepared):
        n = int(n_ce[r])
        ce = float(nll_sum[r]) / n if n else float("nan")
        ce_byte = float(nll_sum[r]) / n_bytes if n and n_bytes else float("nan")
        out.append(SampleTopK(s.sample_id, v[r, :P], i[r, :P], mask[r, :P], int(resp[r].sum()),
                              len(t_ids), ce, n, ce_byte, n_bytes if n else 0,
                              lp[r, :P], dd[r, :P], cc[r, :P]))
    return out


def check_aligned_fraction(teacher: str, aligned: int, response: int, warn_below: float,
                           stop_below: float, source: str) -> float | None:
    """The fraction of pivot response positions the teacher aligned (``fuse.min_aligned_fraction``
    / ``fuse.min_aligned_fraction_hard``): a ``UserWarning`` under ``warn_below``,
    ``TeacherDataError`` naming the teacher under ``stop_below``. ``source`` says where the
    counts come from. None (nothing checked) when ``response`` is 0."""
    if response <= 0:
        return None
    frac = aligned / response
    what = (f"teacher {teacher}: {frac:.1%} of pivot response positions aligned "
            f"({aligned}/{response}, {source})")
    if frac < stop_below:
        raise TeacherDataError(f"{what}, under fuse.min_aligned_fraction_hard={stop_below:g}: "
                               "its distillation terms would cover almost nothing (check its "
                               "tokenizer / alignment)")
    if frac < warn_below:
        warnings.warn(f"{what}, under fuse.min_aligned_fraction={warn_below:g}; its "
                      "distillation terms cover the rest with mask 0", stacklevel=2)
    return frac
