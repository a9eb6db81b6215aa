"""Sequence packing (docs/methods.md §10): several samples per row, each its own segment.

    micro = pack_step(items, seq_len=s, rows_per_micro=mb, pad_id=ds.pad_id)  # one step's samples
    x_per_sample = per_sample(batch, x)       # [b, s, ...] packed rows -> [n, s, ...] per sample
    x_rows = to_rows(batch, x_per_sample, 0)  # its inverse: [n, s, ...] -> [b, s, ...] (0 elsewhere)

A sample of ``n`` ids needs ``L = min(n - 1, s)`` slots: position t holds token ``ids[t]`` and
predicts ``ids[t + 1]``; the last id is only ever a label, so it takes no slot. This DP rank's
samples of one optimizer step are put into rows of ``s`` slots by first-fit-decreasing (longest
first, ties in step order; each goes into the first row with room), rows are taken in the order
they were opened and cut into micro-batches of ``rows_per_micro`` rows (the last one filled up
with empty rows). The result is a function of the step's samples in order, so it is
deterministic for a seed (the seed fixes the sample order) and a resumed run re-packs every step
the same way.

A packed micro-batch holds ``tokens / labels / loss_mask / position_ids [b, s]`` like an unpacked
one (position ids restart at 0 in every segment), plus

- ``segment_ids [b, s]``: the segment's index in its row, -1 on padding slots;
- ``segments [n, 3]``: per sample (row, start, length), samples ordered by row then start;
- ``sample_id [n]`` (host tensor) and ``step_pos`` (a list of n ints): the sample's place in
  the rank's step order, which ``fetch_per_sample`` uses to ask teachers in their (unpacked)
  micro-batch order;
- ``cu_seqlens [m + 1]`` int32 and ``max_seqlen``: the THD boundaries of the rows flattened into
  one sequence, every segment and every row's padding tail a sequence of its own (what
  Transformer Engine's packed attention takes, ``model.packed_seq_params``);
- ``real_tokens`` / ``slots`` (host ints): sample slots and ``b * s``, for the step metrics.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

ROW_KEYS = ("tokens", "labels", "loss_mask")


def sample_slots(n_ids: int, seq_len: int) -> int:
    """Slots a sample of ``n_ids`` ids takes: its positions that predict a next token (>= 1)."""
    return max(min(n_ids - 1, seq_len), 1)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items longest first (ties by index), each into the first bin
    with room; bins in the order they were opened, items in a bin in insertion order."""
    bad = [(i, n) for i, n in enumerate(lengths) if not 1 <= n <= capacity]
    if bad:
        raise ValueError(f"first_fit_decreasing: item {bad[0][0]} has length {bad[0][1]}, "
                         f"outside 1..{capacity}")
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for j, room in enumerate(free):
            if room >= lengths[i]:
                bins[j].append(i)
                free[j] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def _packed_microbatch(b: int, seq_len: int, pad_id: int, placed: list[tuple[int, int, dict]],
                       sample_ids: list[int], step_pos: list[int]) -> dict:
    """``b`` rows holding ``placed`` = (row, start, sequence) in segment order (a sequence has
    ``tokens / labels / loss_mask [s]`` and ``length``) -> one packed micro-batch (the keys of
    the module docstring)."""
    s = seq_len
    out = {"tokens": torch.full((b, s), pad_id, dtype=torch.long),
           "labels": torch.full((b, s), pad_id, dtype=torch.long),
           "loss_mask": torch.zeros(b, s, dtype=torch.float32),
           "position_ids": torch.zeros(b, s, dtype=torch.long),
           "segment_ids": torch.full((b, s), -1, dtype=torch.long)}
    by_row: list[list[tuple[int, int]]] = [[] for _ in range(b)]
    for r, start, seq in placed:
        n = int(seq["length"])
        for k in ROW_KEYS:
            out[k][r, start:start + n] = seq[k][:n]
        out["position_ids"][r, start:start + n] = torch.arange(n)
        by_row[r].append((start, n))
    seqlens = []
    for r, segs in enumerate(by_row):
        end = 0
        for j, (start, n) in enumerate(sorted(segs)):
            assert start == end, "segments of a row must be contiguous from slot 0"
            out["segment_ids"][r, start:start + n] = j
            seqlens.append(n)
            end = start + n
        if end < s:       # the padding tail: a sequence of its own for THD attention
            seqlens.append(s - end)
    out["segments"] = torch.tensor([(r, st, int(q["length"])) for r, st, q in placed],
                                   dtype=torch.long).reshape(-1, 3)
    out["sample_id"] = torch.tensor(sample_ids, dtype=torch.long)
    out["step_pos"] = list(step_pos)
    out["cu_seqlens"] = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out["max_seqlen"] = max(seqlens)
    out["real_tokens"] = sum(int(q["length"]) for _, _, q in placed)
    out["slots"] = b * s
    return out


def pack_step(items: list[dict], *, seq_len: int, rows_per_micro: int, pad_id: int) -> list[dict]:
    """One DP rank's samples of a step (in step order, each with ``length``) -> packed
    micro-batches of ``rows_per_micro`` rows (first-fit-decreasing, module docstring).
    Preference pairs (``chosen_*`` / ``rejected_*`` items) go to ``pack_pairs``."""
    if not items:
        return []
    if "chosen_tokens" in items[0]:
        return pack_pairs(items, seq_len=seq_len, rows_per_micro=rows_per_micro, pad_id=pad_id)
    rows = first_fit_decreasing([int(it["length"]) for it in items], seq_len)
    rows += [[] for _ in range(-len(rows) % rows_per_micro)]      # fill the last micro-batch
    micro = []
    for j in range(0, len(rows), rows_per_micro):
        placed, ids, pos = [], [], []
        for r, row in enumerate(rows[j:j + rows_per_micro]):
            start = 0
            for i in row:
                placed.append((r, start, items[i]))
                ids.append(int(items[i]["sample_id"]))
                pos.append(i)
                start += int(items[i]["length"])
        micro.append(_packed_microbatch(rows_per_micro, seq_len, pad_id, placed, ids, pos))
    return micro


def _side(item: dict, side: str) -> dict:
    return {k: item[f"{side}_{k}"] for k in (*ROW_KEYS, "length")}


def pack_pairs(items: list[dict], *, seq_len: int, rows_per_micro: int, pad_id: int) -> list[dict]:
    """Preference pairs -> packed micro-batches of ``rows_per_micro`` (= 2 x train.micro_batch)
    rows. Chosen and rejected are separate segments, and a pair never leaves its micro-batch
    (the FPO loss needs both of its log-probs there): pairs, longest total first (ties in step
    order), go into the first micro-batch whose rows take both sequences, each sequence into the
    first row with room (chosen first), else into a new micro-batch. Segments are ordered chosen
    of every pair, then rejected, so ``per_sample`` gives ``collate_pairs``' ``[2n, s]`` rows."""
    if rows_per_micro < 2:
        raise ValueError(f"pack_pairs: rows_per_micro must be >= 2, got {rows_per_micro}")
    lengths = [(int(it["chosen_length"]), int(it["rejected_length"])) for it in items]
    bins: list[dict] = []       # {"free": [rows], "pairs": [(i, row_c, start_c, row_r, start_r)]}
    for i in sorted(range(len(items)), key=lambda i: (-sum(lengths[i]), i)):
        lc, lr = lengths[i]
        new = {"free": [seq_len] * rows_per_micro, "pairs": []}
        for mb in bins + [new]:
            free = list(mb["free"])
            rc = next((r for r, room in enumerate(free) if room >= lc), None)
            if rc is None:
                continue
            sc = seq_len - free[rc]
            free[rc] -= lc
            rr = next((r for r, room in enumerate(free) if room >= lr), None)
            if rr is None:
                continue
            mb["pairs"].append((i, rc, sc, rr, seq_len - free[rr]))
            free[rr] -= lr
            mb["free"] = free
            if mb is new:
                bins.append(mb)
            break
    micro = []
    for mb in bins:
        pairs = mb["pairs"]
        placed = ([(rc, sc, _side(items[i], "chosen")) for i, rc, sc, _, _ in pairs]
                  + [(rr, sr, _side(items[i], "rejected")) for i, _, _, rr, sr in pairs])
        micro.append(_packed_microbatch(rows_per_micro, seq_len, pad_id, placed,
                                        [int(items[i]["sample_id"]) for i, *_ in pairs],
                                        [i for i, *_ in pairs]))
    return micro


def is_packed(batch: dict) -> bool:
    return "segments" in batch


def per_sample(batch: dict, x: torch.Tensor, fill=None) -> torch.Tensor:
    """``x [b, s, ...]`` laid out like the batch's rows -> ``[n, s, ...]``, one row per sample:
    row i holds sample i's segment from position 0 (the unpacked layout). After its length:
    ``fill``, or with ``fill=None`` copies of the segment's first slot (real values, so that a
    loss that masks those positions out sees nothing degenerate there). Differentiable
    (indexing); the identity for an unpacked batch."""
    if not is_packed(batch):
        return x
    seg = batch["segments"].to(x.device)                              # [n, 3]
    s = x.shape[1]
    t = torch.arange(s, device=x.device)
    valid = t[None, :] < seg[:, 2:3]                                  # [n, s]
    cols = seg[:, 1:2] + torch.where(valid, t[None, :], 0)            # [n, s]
    out = x[seg[:, 0:1].expand_as(cols), cols]                        # [n, s, ...]
    if fill is None:
        return out
    return out.masked_fill(~valid.view(valid.shape + (1,) * (x.dim() - 2)), fill)


def to_rows(batch: dict, x: torch.Tensor, fill) -> torch.Tensor:
    """The inverse of ``per_sample``: ``x [n, s, ...]`` one row per sample (the unpacked layout)
    -> ``[b, s, ...]`` laid out like the batch's rows. Sample i's first ``length`` positions go
    to its segment; every slot no segment covers (padding, empty rows) is ``fill``, and so are the
    per-sample positions after a sample's length (they have no slot). One scatter by the index
    map ``per_sample`` reads, on ``x``'s device, with no data-dependent shape (no host sync);
    differentiable in ``x``; the identity for an unpacked batch."""
    if not is_packed(batch):
        return x
    seg = batch["segments"].to(x.device)                              # [n, 3]
    n, s = x.shape[0], x.shape[1]
    if seg.shape[0] != n:
        raise ValueError(f"to_rows: {n} per-sample rows for a batch of {seg.shape[0]} samples")
    b = batch["loss_mask"].shape[0]
    t = torch.arange(s, device=x.device)
    valid = t[None, :] < seg[:, 2:3]                                  # [n, s]
    # flat slot row * s + start + t; a position without a slot goes to one spare slot b * s
    flat = torch.where(valid, seg[:, 0:1] * s + seg[:, 1:2] + t[None, :], b * s)
    out = x.new_full((b * s + 1,) + tuple(x.shape[2:]), fill)
    out = out.index_put((flat.reshape(-1),), x.reshape((n * s,) + tuple(x.shape[2:])))
    return out[:b * s].reshape((b, s) + tuple(x.shape[2:]))


def fetch_per_sample(fetch: Callable, microbatches: list[dict], seq_len: int,
                     micro_batch: int) -> list[tuple]:
    """A teacher's ``fetch(sample_ids, seq_len) -> (values [m,s,K], ids, aligned [m,s], ce [m])``
    for every micro-batch, each result in the batch's per-sample order (``per_sample``).

    Unpacked: one ``fetch`` per micro-batch, as always. Packed: the step's samples are taken in
    step order and asked for in groups of ``micro_batch`` -- the unpacked micro-batches, which
    are what an online teacher computes and sends, in its order (its fingerprint check passes)
    -- then each packed micro-batch takes its samples' rows. Offline shards are read by sample
    id, so both paths give the same tensors."""
    if not microbatches or not is_packed(microbatches[0]):
        return [fetch(mb["sample_id"], seq_len) for mb in microbatches]
    owner = {}                                   # step position -> (micro-batch, index in it)
    for m, mb in enumerate(microbatches):
        for i, p in enumerate(mb["step_pos"]):
            owner[p] = (m, i)
    n = len(owner)
    if sorted(owner) != list(range(n)):
        raise ValueError("fetch_per_sample: the micro-batches do not hold one step's samples")
    ids = torch.empty(n, dtype=torch.long)
    for p, (m, i) in owner.items():
        ids[p] = microbatches[m]["sample_id"][i]
    parts = [fetch(ids[j:j + micro_batch], seq_len) for j in range(0, n, micro_batch)]
    # a field a teacher does not give (None, e.g. log-probs without the hybrid loss) stays None
    step = [None if parts[0][f] is None else torch.cat([part[f] for part in parts])
            for f in range(len(parts[0]))]
    return [tuple(None if t is None else t[mb["step_pos"]] for t in step) for mb in microbatches]


def collate_unpacked_metrics(items: list[dict], seq_len: int) -> dict:
    """``real_tokens`` / ``slots`` of an unpacked micro-batch (for the step metrics)."""
    real = sum(int(it["length"]) for it in items) if all("length" in it for it in items) else None
    slots = len(items) * seq_len
    return {"real_tokens": slots if real is None else real, "slots": slots}
