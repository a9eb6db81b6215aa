"""Top-K shard and source log-prob files: exact round trip, size, corruption and header checks."""

import os

import pytest
import torch

from megatron_fusion.teachers.shards import (LogprobHeader, SourceLogprobStore, TopKHeader, TopKReader,
                                        TopKStoreError, TopKWriter, read_topk_header)


def _header(**kw):
    base = dict(teacher="t0", teacher_tokenizer_hash="a" * 64, pivot_tokenizer_hash="b" * 64,
                k=10, dataset_hash="c" * 64, dtype="bfloat16")
    base.update(kw)
    return TopKHeader(**base)


def _samples(n=6, k=10, seed=0, with_ce=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for sid in range(0, 3 * n, 3):                      # sparse, increasing sample ids
        s = int(torch.randint(5, 40, (1,), generator=g))
        mask = torch.rand(s, generator=g) < 0.7
        values = torch.randn(s, k, generator=g) * 3
        ids = torch.randint(0, 150_000, (s, k), generator=g)
        values[~mask], ids[~mask] = 0, 0
        ce = (float(torch.rand(1, generator=g)) * 5, int(torch.randint(1, 50, (1,), generator=g)))
        out.append((sid, values, ids, mask) + (ce if with_ce else ()))
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_roundtrip_exact(tmp_path, dtype):
    samples = _samples(with_ce=True)
    with TopKWriter(tmp_path / "s0.topk", _header(dtype=dtype)) as w:
        for s in samples[:3]:
            w.add(*s)
    with TopKWriter(tmp_path / "s1.topk", _header(dtype=dtype)) as w:
        for s in samples[3:]:
            w.add(*s)
    r = TopKReader(tmp_path, expected={"k": 10, "teacher": "t0", "dtype": dtype})
    assert r.sample_ids == [s[0] for s in samples]
    tdt = getattr(torch, dtype)
    for sid, values, ids, mask, ce, ce_tokens in samples:
        v, i, m = r.get(sid)
        assert torch.equal(m, mask)
        assert torch.equal(i, ids)
        assert torch.equal(v, values.to(tdt).float())   # exact after the storage dtype
        v2, i2, m2 = r.get(sid, seq_len=50)             # padded to seq_len
        assert v2.shape == (50, 10) and not m2[len(mask):].any()
        assert torch.equal(v2[: len(mask)], v)
        v3, _, m3 = r.get(sid, seq_len=4)               # cut
        assert torch.equal(v3, v[:4]) and torch.equal(m3, mask[:4])
    bv, bi, bm = r.batch([0, 6], seq_len=40)
    assert bv.shape == (2, 40, 10) and bi.shape == (2, 40, 10) and bm.shape == (2, 40)
    # per-sample teacher CE: exact after float32, in the order asked (across shards)
    order = [15, 0, 9, 3]
    want = {s[0]: s[4:] for s in samples}
    ce = r.teacher_ce(order)
    assert ce.dtype == torch.float32 and ce.shape == (4,)
    assert torch.equal(ce, torch.tensor([want[i][0] for i in order], dtype=torch.float32))
    assert torch.equal(r.teacher_ce(torch.tensor(order)), ce)
    assert r.teacher_ce_tokens(order).tolist() == [want[i][1] for i in order]
    with pytest.raises(KeyError, match="sample id 1 is in none"):
        r.teacher_ce([0, 1])
    h = read_topk_header(tmp_path / "s1.topk")
    assert (h["sample_id_start"], h["sample_id_end"], h["n_samples"]) == (9, 16, 3)
    with pytest.raises(KeyError, match="sample id 1 is in none"):
        r.get(1)


def test_teacher_ce_default_and_old_format(tmp_path):
    p = tmp_path / "s.topk"
    with TopKWriter(p, _header()) as w:
        w.add(*_samples(1)[0])                     # no CE given: NaN over 0 tokens
    r = TopKReader(p)
    assert r.teacher_ce([0]).isnan().all() and r.teacher_ce_tokens([0]).tolist() == [0]
    # a version-1 shard (no CE in the index) is refused by name, not misread
    raw = bytearray(p.read_bytes())
    raw[8:12] = (1).to_bytes(4, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(TopKStoreError, match=r"s\.topk: format version 1, this reader reads 3"):
        TopKReader(p)
    # a version-2 shard (CE per teacher token only) too: it cannot be converted without the text
    raw[8:12] = (2).to_bytes(4, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(TopKStoreError, match=r"s\.topk: format version 2, this reader reads 3 and 4 "
                       r"\(its teacher CE is per teacher token"):
        TopKReader(p)


def test_bytes_per_token(tmp_path):
    s, k = 1000, 10
    mask = torch.ones(s, dtype=torch.bool)
    with TopKWriter(tmp_path / "x.topk", _header()) as w:
        w.add(0, torch.randn(s, k), torch.randint(0, 1000, (s, k)), mask)
    size = os.path.getsize(tmp_path / "x.topk")
    assert (size - 1000) / s <= 60.2     # 60 B per aligned position + 1 bit + header/index


def test_corruption_and_truncation_name_the_file(tmp_path):
    p = tmp_path / "s.topk"
    with TopKWriter(p, _header()) as w:
        for s in _samples(4):
            w.add(*s)
    good = p.read_bytes()
    for where in (20, len(good) // 2, len(good) - 40, len(good) - 1):   # header, data, index...
        bad = bytearray(good)
        bad[where] ^= 0x01
        p.write_bytes(bytes(bad))
        with pytest.raises(TopKStoreError, match=r"s\.topk"):   # at open or at the first read
            TopKReader(p).batch([0, 1, 2, 3], 8)
    for cut in (len(good) - 1, len(good) // 2, 10):
        p.write_bytes(good[:cut])
        with pytest.raises(TopKStoreError, match=r"s\.topk: truncated"):
            TopKReader(p)
    p.write_bytes(good)
    TopKReader(p)                                          # intact again


def test_header_mismatch_names_field(tmp_path):
    p = tmp_path / "s.topk"
    with TopKWriter(p, _header()) as w:
        w.add(*_samples(1)[0])
    for field, value in (("k", 5), ("dataset_hash", "d" * 64), ("teacher", "t1"),
                         ("pivot_tokenizer_hash", "e" * 64), ("dtype", "float16")):
        with pytest.raises(TopKStoreError, match=rf"s\.topk: header field '{field}'"):
            TopKReader(p, expected={field: value})
    # two shards of different runs in one reader
    q = tmp_path / "t.topk"
    with TopKWriter(q, _header(teacher_tokenizer_hash="f" * 64)) as w:
        w.add(5, *_samples(1)[0][1:])
    with pytest.raises(TopKStoreError, match=r"t\.topk: header field 'teacher_tokenizer_hash'"):
        TopKReader([p, q])


def test_writer_is_atomic_and_validates(tmp_path):
    p = tmp_path / "s.topk"
    with pytest.raises(RuntimeError):
        with TopKWriter(p, _header()) as w:
            w.add(*_samples(1)[0])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []                  # nothing half-written
    w = TopKWriter(p, _header())
    with pytest.raises(ValueError, match="must be"):
        w.add(0, torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    w.add(3, torch.zeros(3, 10), torch.zeros(3, 10, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="must increase"):
        w.add(3, torch.zeros(3, 10), torch.zeros(3, 10, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype"):
        _header(dtype="float32")


def test_source_logprobs(tmp_path):
    recs = [(0, -12.5, 7, -20.25, 9), (2, -3.0, 2, -4.5, 3), (7, -0.125, 1, -99.0, 40)]
    hdr = LogprobHeader(source="s0", source_tokenizer_hash="a" * 64, dataset_hash="c" * 64)
    SourceLogprobStore.write(tmp_path / "s0-00000.logp", hdr, recs[:2])
    SourceLogprobStore.write(tmp_path / "s0-00001.logp",
                             LogprobHeader(source="s0", source_tokenizer_hash="a" * 64,
                                           dataset_hash="c" * 64), recs[2:])
    st = SourceLogprobStore(tmp_path, expected={"source": "s0", "dataset_hash": "c" * 64})
    assert len(st) == 3 and 2 in st and 1 not in st
    assert st.get(7) == dict(zip(SourceLogprobStore.FIELDS, recs[2]))
    b = st.batch([7, 0])
    assert b["chosen_logprob"].tolist() == [-0.125, -12.5] and b["rejected_tokens"].tolist() == [40, 9]
    with pytest.raises(TopKStoreError, match=r"s0-00000\.logp: header field 'source_tokenizer_hash'"):
        SourceLogprobStore(tmp_path, expected={"source_tokenizer_hash": "z"})
    p = tmp_path / "s0-00001.logp"
    raw = bytearray(p.read_bytes())
    raw[-40] ^= 0x10
    p.write_bytes(bytes(raw))
    with pytest.raises(TopKStoreError, match=r"s0-00001\.logp: checksum"):
        SourceLogprobStore(tmp_path)
    p.write_bytes(bytes(raw[:-5]))
    with pytest.raises(TopKStoreError, match=r"s0-00001\.logp: truncated"):
        SourceLogprobStore(tmp_path)
