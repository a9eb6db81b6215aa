"""Top-K shard checks that must not cost O(dataset) per rank at start: each shard's checksum is
verified once per process, when it is first read, and never for a shard that is not read; a
flipped byte is still caught before anything of that shard is used. Header ``meta`` fields are
checked by name (``meta.eps``)."""

from __future__ import annotations

import pytest
import torch

from megatron_fusion.errors import TeacherDataError
from megatron_fusion.teachers import shards
from megatron_fusion.teachers.offline import OfflineTeacher
from megatron_fusion.teachers.shards import TopKHeader, TopKReader, TopKStoreError, TopKWriter

K = 4


def _write(d, n_shards=3, per=4, meta=None):
    paths = []
    for si in range(n_shards):
        p = d / f"t0-{si:05d}.topk"
        header = TopKHeader(teacher="t0", teacher_tokenizer_hash="h", pivot_tokenizer_hash="p",
                            k=K, dataset_hash="d",
                            meta=dict({"eps": 1e-6, "alignment": "offset"} if meta is None else meta))
        with TopKWriter(p, header) as w:
            for sid in range(si * per, (si + 1) * per):
                g = torch.Generator().manual_seed(sid)
                mask = torch.rand(12, generator=g) > 0.3
                w.add(sid, torch.randn(12, K, generator=g), torch.randint(0, 99, (12, K),
                                                                          generator=g),
                      mask, 1.0 + sid, 3, 0.5 + sid, 9)
        paths.append(p)
    return paths


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = shards.verify_file_checksum

    def counting(path, raw=None):
        calls.append(str(path))
        return real(path, raw)

    monkeypatch.setattr(shards, "verify_file_checksum", counting)
    return calls


def test_each_shard_is_hashed_once_when_first_read(tmp_path, spy):
    paths = _write(tmp_path)
    r = TopKReader(tmp_path, expected={"teacher": "t0", "k": K})
    assert spy == []                                 # opening: headers and sizes only
    assert 5 in r and len(r) == 12                   # the sample-id index needs no checksum
    r.get(0, 16)
    r.batch([1, 2, 3], 16)
    r.teacher_ce_byte([0, 3])
    assert spy == [str(paths[0])]                    # shard 0, once
    r.batch([4, 0, 7], 16)
    r.teacher_ce([5])
    assert spy == [str(paths[0]), str(paths[1])]     # shard 1 once; shard 2 never read, never hashed
    assert r.verified == {0, 1}


def test_flipped_byte_is_caught_before_use(tmp_path, spy):
    paths = _write(tmp_path)
    raw = bytearray(paths[1].read_bytes())
    raw[len(raw) // 2] ^= 0x10                       # inside shard 1's sample data
    paths[1].write_bytes(bytes(raw))
    teacher = OfflineTeacher("t0", str(tmp_path), {"teacher": "t0", "k": K})
    v, _, _, ce, _ = teacher.fetch(torch.tensor([0, 1]), 16)     # shard 0 is intact: usable
    assert v.shape == (2, 16, K) and torch.equal(ce, torch.tensor([0.5, 1.5]))
    for read in (lambda: teacher.fetch(torch.tensor([0, 5]), 16),
                 lambda: teacher.reader.teacher_ce_byte([6]),
                 lambda: teacher.reader.get(4)):
        with pytest.raises((TeacherDataError, TopKStoreError),
                           match=r"t0-00001\.topk: checksum mismatch"):
            read()
    assert 1 not in teacher.reader.verified          # still refused on the next read


def test_corrupt_index_is_reported_as_corruption_not_as_a_missing_sample(tmp_path):
    paths = _write(tmp_path, n_shards=1)
    raw = bytearray(paths[0].read_bytes())
    first = 16 + int.from_bytes(raw[12:16], "little")  # the index starts right after the header
    raw[first] ^= 0x40                                # sample id 0 -> 64
    paths[0].write_bytes(bytes(raw))
    teacher = OfflineTeacher("t0", str(tmp_path), {"teacher": "t0"})
    with pytest.raises(TeacherDataError, match=r"teacher t0: .*t0-00000\.topk: checksum mismatch"):
        teacher.check_covers([0, 1, 2, 3])


@pytest.mark.parametrize("field,value,want", [("meta.eps", 1e-6, 1e-5),
                                              ("meta.alignment", "offset", "mined")])
def test_meta_field_mismatch_names_file_and_field(tmp_path, field, value, want):
    meta = {"eps": 1e-6, "alignment": "offset", field[5:]: want}
    _write(tmp_path, n_shards=1, meta=meta)
    with pytest.raises(TopKStoreError, match=rf"t0-00000\.topk: header field '{field}' is "
                                             rf"{want!r}, the run expects {value!r}"):
        TopKReader(tmp_path, expected={field: value})
    _write(tmp_path, n_shards=1, meta={})
    with pytest.raises(TopKStoreError, match=rf"t0-00000\.topk: header has no field '{field}'"):
        TopKReader(tmp_path, expected={field: value})
