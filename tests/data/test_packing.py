"""Sequence packing, data side (data/packing.py, docs/methods.md §10): first-fit-decreasing,
the packed rows against the samples they hold, the per-sample view against the unpacked
collate, the attention layouts (block-diagonal mask against a loop reference, THD cu_seqlens),
and teacher top-K fetched for packed batches: an online-style teacher (fixed message order,
fingerprint checked per unpacked micro-batch) and an offline one (by sample id) give identical
tensors."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_fusion.data.order import collate
from megatron_fusion.data.packing import (fetch_per_sample, first_fit_decreasing, pack_step,
                                          per_sample, to_rows)
from megatron_fusion.model import block_causal_mask, packed_seq_params

S, PAD = 16, 3


def _items(lengths, seed=0):
    """Fake dataset items laid out like SFTDataset's: ``length`` slots, then padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        tokens = torch.full((S,), PAD, dtype=torch.long)
        labels = torch.full((S,), PAD, dtype=torch.long)
        mask = torch.zeros(S)
        tokens[:n] = torch.randint(10, 100, (n,), generator=g)
        labels[:n] = torch.randint(10, 100, (n,), generator=g)
        mask[:n] = (torch.rand(n, generator=g) > 0.4).float()
        out.append({"tokens": tokens, "labels": labels, "loss_mask": mask, "sample_id": 100 + i,
                    "length": n})
    return out


def test_ffd_closed_form_and_ties():
    # 5+1, 4+2, 3: longest first, each into the first bin with room
    assert first_fit_decreasing([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]
    # ties keep the input order
    assert first_fit_decreasing([2, 2, 2, 2], 4) == [[0, 1], [2, 3]]
    assert first_fit_decreasing([], 4) == []
    with pytest.raises(ValueError, match="item 1 has length 7"):
        first_fit_decreasing([1, 7], 6)


def test_ffd_properties_random():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, S) for _ in range(rng.randint(1, 30))]
        bins = first_fit_decreasing(lengths, S)
        assert bins == first_fit_decreasing(list(lengths), S)               # deterministic
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= S for b in bins)
        # replay: longest first, each item went into the first bin with room at that moment
        where = {i: j for j, b in enumerate(bins) for i in b}
        fill = [0] * len(bins)
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            first = next((j for j in range(len(bins)) if fill[j] and fill[j] + lengths[i] <= S),
                         fill.index(0) if 0 in fill else None)
            assert where[i] == first, (lengths, i)
            fill[where[i]] += lengths[i]
        # an FFD packing never needs more than 11/9 OPT + 1 bins; OPT >= ceil(total / S)
        assert len(bins) <= 11 / 9 * -(-sum(lengths) // S) + 1


def test_packed_rows_hold_the_samples_and_per_sample_gives_unpacked_layout():
    lengths = [7, 16, 3, 5, 9, 1, 4]
    items = _items(lengths)
    micro = pack_step(items, seq_len=S, rows_per_micro=2, pad_id=PAD)
    n_rows = sum(mb["tokens"].shape[0] for mb in micro)
    assert n_rows % 2 == 0 and all(mb["tokens"].shape == (2, S) for mb in micro)
    seen = []
    for mb in micro:
        assert mb["real_tokens"] == int(mb["segments"][:, 2].sum()) and mb["slots"] == 2 * S
        for i, (r, st, n) in enumerate(mb["segments"].tolist()):
            it = items[mb["step_pos"][i]]
            assert int(mb["sample_id"][i]) == it["sample_id"] and n == it["length"]
            for k in ("tokens", "labels", "loss_mask"):
                assert torch.equal(mb[k][r, st:st + n], it[k][:n]), k
            assert mb["position_ids"][r, st:st + n].tolist() == list(range(n))
            assert (mb["segment_ids"][r, st:st + n] == mb["segment_ids"][r, st]).all()
            seen.append(mb["step_pos"][i])
        # padding slots: segment -1, mask 0
        pad = mb["segment_ids"] < 0
        assert (mb["loss_mask"][pad] == 0).all() and (mb["tokens"][pad] == PAD).all()
        # the per-sample view is the unpacked collate of the same samples (masks: exactly)
        ref = collate([items[p] for p in mb["step_pos"]])
        assert torch.equal(per_sample(mb, mb["loss_mask"], fill=0), ref["loss_mask"])
        assert torch.equal(per_sample(mb, mb["labels"], fill=PAD), ref["labels"])
        assert torch.equal(per_sample(mb, mb["tokens"], fill=PAD), ref["tokens"])
    assert sorted(seen) == list(range(len(items)))
    # 45 real tokens in 4 rows of 16
    assert sum(mb["real_tokens"] for mb in micro) == sum(lengths)
    assert n_rows == 4


def test_per_sample_gradient_goes_to_the_segment_slots():
    items = _items([5, 9, 2])
    mb = pack_step(items, seq_len=S, rows_per_micro=1, pad_id=PAD)[0]
    x = torch.randn(1, S, 3, dtype=torch.float64, requires_grad=True)
    y = per_sample(mb, x)                                              # [3, S, 3]
    w = torch.randn_like(y)
    valid = torch.arange(S)[None] < mb["segments"][:, 2:3]
    (y * w * valid[..., None]).sum().backward()
    ref = torch.zeros(1, S, 3, dtype=torch.float64)
    for i, (r, st, n) in enumerate(mb["segments"].tolist()):
        ref[r, st:st + n] += w[i, :n]
    assert torch.equal(x.grad, ref)
    # unpacked batches: the identity
    plain = collate(items)
    assert per_sample(plain, plain["tokens"]) is plain["tokens"]


def test_to_rows_inverts_per_sample_and_fills_the_other_slots():
    """``to_rows`` (the hybrid loss's per-sample teacher inputs -> the packed rows) against a
    loop reference: each sample's first ``length`` positions in its segment, ``fill`` in every
    other slot (padding tails, an empty row); ``per_sample`` of it gives the samples back."""
    lengths = [7, 16, 3, 5, 9, 1, 4, 2]
    micro = pack_step(_items(lengths), seq_len=S, rows_per_micro=2, pad_id=PAD)
    assert len(micro) == 2 and (micro[1]["segments"][:, 0] == 1).sum() == 0  # an empty row too
    g = torch.Generator().manual_seed(5)
    for mb in micro:
        n, b = mb["segments"].shape[0], mb["tokens"].shape[0]
        valid = torch.arange(S)[None] < mb["segments"][:, 2:3]              # [n, S]
        cases = [(torch.randn(n, S, 4, generator=g, dtype=torch.float64), -torch.inf),
                 (torch.randint(0, 50, (n, S, 2, 3), generator=g), -1),
                 (torch.rand(n, S, generator=g) > 0.3, False)]
        for x, fill in cases:
            ref = torch.full((b, S) + x.shape[2:], fill, dtype=x.dtype)
            for i, (r, st, ln) in enumerate(mb["segments"].tolist()):
                ref[r, st:st + ln] = x[i, :ln]
            got = to_rows(mb, x, fill)
            assert got.dtype == x.dtype and torch.equal(got, ref)
            # the round trip: per_sample(to_rows(x)) == x on every sample position
            back = per_sample(mb, got, fill=fill)
            keep = valid.view(valid.shape + (1,) * (x.dim() - 2))
            assert torch.equal(back, torch.where(keep, x, torch.full_like(x, fill)))
        # differentiable: the gradient of the rows lands on each sample's positions, 0 after
        x = torch.randn(n, S, 2, dtype=torch.float64, requires_grad=True)
        w = torch.randn(b, S, 2, dtype=torch.float64)
        (to_rows(mb, x, 0.0) * w).sum().backward()
        assert torch.equal(x.grad, torch.where(valid[..., None], per_sample(mb, w), 0.0))
    with pytest.raises(ValueError, match="to_rows: 2 per-sample rows"):
        to_rows(micro[0], torch.zeros(2, S), 0)
    plain = collate(_items([3, 4]))
    x = torch.randn(2, S)
    assert to_rows(plain, x, 0) is x                                        # unpacked: identity


def test_block_causal_mask_matches_loop_reference():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    got = block_causal_mask(seg)
    assert got.shape == (2, 1, 8, 8) and got.dtype == torch.bool
    for b in range(2):
        for q in range(8):
            for k in range(8):
                allowed = k <= q and seg[b, q] == seg[b, k]
                assert bool(got[b, 0, q, k]) == (not allowed), (b, q, k)
    # one segment filling the row is megatron's plain causal mask (True above the diagonal)
    assert torch.equal(got[1, 0], torch.ones(8, 8, dtype=torch.bool).triu(1))


def test_thd_packed_seq_params_from_the_rows():
    """What Transformer Engine gets (built on CPU here): the rows flattened, every segment and
    every padding tail a sequence of its own."""
    items = _items([7, 16, 3, 5])
    mb = pack_step(items, seq_len=S, rows_per_micro=2, pad_id=PAD)[0]
    # rows: [16], [7, 5, 3] + 1 padding slot
    assert mb["segments"][:, 2].tolist() == [16, 7, 5, 3]
    p = packed_seq_params(mb)
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == [0, 16, 23, 28, 31, 32] == p.cu_seqlens_kv.tolist()
    assert p.max_seqlen_q == p.max_seqlen_kv == 16
    # the boundaries are those of segment_ids flattened (a loop reference)
    flat = (mb["segment_ids"] + 100 * torch.arange(2)[:, None]).flatten().tolist()
    bounds = [0] + [i for i in range(1, len(flat)) if flat[i] != flat[i - 1]] + [len(flat)]
    assert bounds == p.cu_seqlens_q.tolist()


class _WireTeacher:
    """An online-style source: it computes the unpacked micro-batches of the step in order and
    checks each request's fingerprint, like the online client (it raises on a mismatch)."""

    def __init__(self, table, groups):
        self.table, self.groups, self.calls = table, list(groups), 0

    def fetch(self, sample_ids, seq_len):
        from megatron_fusion.teachers.online.protocol import batch_fingerprint

        want = self.groups[self.calls]
        self.calls += 1
        if batch_fingerprint(sample_ids) != batch_fingerprint(torch.tensor(want)):
            raise AssertionError(f"fingerprint mismatch: asked {sample_ids.tolist()}, sent {want}")
        return _OfflineTeacher(self.table).fetch(torch.tensor(want), seq_len)


class _OfflineTeacher:
    def __init__(self, table):
        self.table = table

    def fetch(self, sample_ids, seq_len):
        rows = [self.table[int(s)] for s in sample_ids]
        return tuple(torch.stack([r[f] for r in rows]) for f in range(4))


def test_online_and_offline_teachers_give_identical_packed_batches():
    lengths = [7, 16, 3, 5, 9, 1, 4, 12]
    items = _items(lengths, seed=1)
    g = torch.Generator().manual_seed(2)
    table = {it["sample_id"]: (torch.randn(S, 4, generator=g), torch.randint(0, 50, (S, 4), generator=g),
                               torch.rand(S, generator=g) > 0.3, torch.rand((), generator=g))
             for it in items}
    mbsz = 2
    micro = pack_step(items, seq_len=S, rows_per_micro=mbsz, pad_id=PAD)
    groups = [[it["sample_id"] for it in items[j:j + mbsz]] for j in range(0, len(items), mbsz)]
    wire = _WireTeacher(table, groups)
    online = fetch_per_sample(wire.fetch, micro, S, mbsz)
    offline = fetch_per_sample(_OfflineTeacher(table).fetch, micro, S, mbsz)
    assert wire.calls == len(groups)
    for mb, on, off in zip(micro, online, offline):
        for a, b in zip(on, off):
            assert torch.equal(a, b)
        # each per-sample row is that sample's own top-K (the independent reference: the table)
        for i, sid in enumerate(mb["sample_id"].tolist()):
            for f in range(4):
                assert torch.equal(on[f][i], table[sid][f])
    # a teacher asked in the packed order instead fails its fingerprint check
    with pytest.raises(AssertionError, match="fingerprint"):
        bad = _WireTeacher(table, groups)
        for mb in micro:
            bad.fetch(mb["sample_id"], S)
    # unpacked micro-batches: one fetch per micro-batch, as before
    plain = [collate(items[j:j + mbsz]) for j in range(0, len(items), mbsz)]
    wire = _WireTeacher(table, groups)
    got = fetch_per_sample(wire.fetch, plain, S, mbsz)
    assert wire.calls == len(plain)
    assert torch.equal(got[1][0], torch.stack([table[int(s)][0] for s in plain[1]["sample_id"]]))


def _pairs(lengths, seed=0):
    """Fake preference items: (chosen, rejected) lengths per pair."""
    flat = _items([n for pair in lengths for n in pair], seed)
    out = []
    for j in range(len(lengths)):
        it = {"sample_id": 500 + j}
        for side, src in (("chosen", flat[2 * j]), ("rejected", flat[2 * j + 1])):
            for k in ("tokens", "labels", "loss_mask", "length"):
                it[f"{side}_{k}"] = src[k]
        out.append(it)
    return out


def test_pairs_stay_in_one_micro_batch_and_unpack_to_collate_pairs():
    from megatron_fusion.stages.fpo import collate_pairs

    rng = random.Random(3)
    lengths = [(rng.randint(1, S), rng.randint(1, S)) for _ in range(9)]
    items = _pairs(lengths)
    micro = pack_step(items, seq_len=S, rows_per_micro=4, pad_id=PAD)
    seen = []
    for mb in micro:
        assert mb["tokens"].shape == (4, S)
        n = len(mb["sample_id"])
        assert len(mb["segments"]) == 2 * n        # both sequences of every pair are here
        ref = collate_pairs([items[p] for p in mb["step_pos"]])
        assert torch.equal(mb["sample_id"], ref["sample_id"])
        assert torch.equal(per_sample(mb, mb["loss_mask"], fill=0), ref["loss_mask"])
        assert torch.equal(per_sample(mb, mb["labels"], fill=PAD), ref["labels"])
        assert torch.equal(per_sample(mb, mb["tokens"], fill=PAD), ref["tokens"])
        assert mb["real_tokens"] == sum(sum(lengths[p]) for p in mb["step_pos"])
        # rows are filled within capacity, segments contiguous (cu_seqlens end at b*s)
        assert int(mb["cu_seqlens"][-1]) == 4 * S
        seen += mb["step_pos"]
    assert sorted(seen) == list(range(len(items)))
    assert pack_step(items, seq_len=S, rows_per_micro=4, pad_id=PAD)[0]["sample_id"].tolist() == \
        micro[0]["sample_id"].tolist()                                     # deterministic
    assert len(micro) < len(items) / 2    # 9 pairs, 2 pairs a micro-batch unpacked: fewer here


class _Data:
    pad_id = PAD

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_packing_efficiency_closed_form():
    """Samples of s/4 slots: unpacked a quarter of every row is real; packed, four fill a row."""
    from megatron_fusion.config import load_config
    from megatron_fusion.data.order import SampleOrder, packing_efficiency

    cfg = load_config(None, [f"model.seq_length={S}", "train.global_batch=8", "train.micro_batch=2",
                             "data.packing=greedy", "train.steps=3"])
    ds = _Data(_items([S // 4] * 24))
    eff = packing_efficiency(ds, SampleOrder(len(ds), 0), cfg, dp=1)
    assert eff == {"none": 0.25, "greedy": 1.0}
    # DP2: 4 samples a rank fill one row; the micro-batch of 2 rows takes an empty one too
    assert packing_efficiency(ds, SampleOrder(len(ds), 0), cfg, dp=2)["greedy"] == 0.5
    # 6 slots: 2 a row (4 free slots each), 8 samples -> 4 rows, 36 / (4*16) real
    ds = _Data(_items([6] * 24))
    assert packing_efficiency(ds, SampleOrder(len(ds), 0), cfg, dp=1)["greedy"] == 48 / 64


def test_what_packing_does_not_cover_fails_naming_the_field():
    from megatron_fusion.config import (Config, ConfigError, DataConfig, FuseConfig, ParallelConfig,
                                        TeacherConfig)
    from megatron_fusion.data.order import check_packing

    packed = DataConfig(packing="greedy")
    with pytest.raises(ConfigError, match="data.packing.*parallel.vpp"):
        check_packing(Config(data=packed, parallel=ParallelConfig(pp=2, vpp=2)))
    hybrid = FuseConfig(teachers=[TeacherConfig(name="tA", tokenizer="t.model")], loss="hybrid")
    check_packing(Config(stage="fuse", data=packed, fuse=hybrid))  # hybrid packs (to_rows)
    check_packing(Config(stage="fpo", data=packed))          # fpo packs (chosen/rejected segments)
    with pytest.raises(ConfigError, match="data.packing"):
        DataConfig(packing="best")
