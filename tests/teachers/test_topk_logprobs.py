"""Teacher log-probs in the top-K contract (format-4 shards, the online wire, docs/methods.md §6).

- ``topk_logprob_stats`` (vocab-parallel log p at the top-K ids, d = sigma + eps, c = mu - lse)
  against a float64 serial reference: full vocab, padding columns, ties, TP 2 and 4 with uneven
  shards (one launch of 4 gloo ranks);
- recovery through a written and read shard vs ``log_softmax`` of the teacher logits at bf16,
  fp16 and fp32 (<= 1e-3 nats; the bound is the 2^-11 rounding of the 16-bit code);
- bytes per aligned position measured; the derived standardised values vs ``standardized_topk``;
- old (format-3) shards read as before, ``require_logprobs`` refuses them in one line;
- offline == online: the same teacher results through a shard and through the wire's encode /
  decode give identical tensors; a flipped byte in the log-prob codes fails the checksum.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/teachers/test_topk_logprobs.py
"""

from __future__ import annotations

import io
import os

import pytest
import torch

from megatron_fusion.errors import TeacherDataError
from megatron_fusion.local_ranks import run_on_ranks
from megatron_fusion.losses import standardized_topk
from megatron_fusion.teachers.logprobs import (LOGP_MIN, LOGP_STEP, decode_logprobs,
                                               encode_logprobs, standardized_from_logprobs,
                                               topk_logprob_stats)
from megatron_fusion.teachers.offline import OfflineTeacher
from megatron_fusion.teachers.online.protocol import decode_topk, topk_message
from megatron_fusion.teachers.shards import (LOGP_DTYPE, TopKHeader, TopKReader, TopKStoreError,
                                             TopKWriter, read_topk_header)
from megatron_fusion.teachers.topk import SampleTopK

F64 = torch.float64
EPS = 1e-6
K = 10


def _reference(full: torch.Tensor, vocab: int, k: int, eps: float = EPS):
    """float64, full vocabulary, written out: top-K ids (value desc, id asc), log p, d, c."""
    z = full[..., :vocab].double()
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    mu = z.mean(-1)
    sigma = ((z - mu[..., None]) ** 2).mean(-1).sqrt()
    return order, logp.gather(-1, order), sigma + eps, mu - torch.logsumexp(z, -1)


def _case(name, *, vocab, padded, ints=False, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    if ints:   # many ties: the top-K's ties go to the lower id
        full = torch.randint(-3, 4, (2, 5, padded), generator=g).to(F64)
    else:
        full = torch.randn(2, 5, padded, generator=g, dtype=F64) * 3
    full[..., vocab:] = 50.0          # Megatron padding: large, must never count
    return {"name": name, "full": full.to(dtype), "vocab": vocab, "k": min(K, vocab)}


CASES = [_case("randn", vocab=37, padded=48), _case("ties", vocab=37, padded=48, ints=True),
         # vocab 30 in 48 columns: at TP 4 the last rank holds padding only
         _case("padding_rank", vocab=30, padded=48, seed=3),
         _case("bf16", vocab=45, padded=48, seed=5, dtype=torch.bfloat16)]


def _check(case, logp, d, c, ids):
    ref_ids, ref_lp, ref_d, ref_c = _reference(case["full"], case["vocab"], case["k"])
    assert torch.equal(ids, ref_ids), case["name"]
    assert logp.dtype == d.dtype == c.dtype == F64
    # float64 logits: float64 sums; bf16 logits: fp32 sweeps (as standardized_topk's)
    tol = 1e-9 if case["full"].dtype == F64 else 2e-6
    assert torch.allclose(logp, ref_lp, atol=tol, rtol=0), case["name"]
    assert torch.allclose(d, ref_d, atol=tol, rtol=tol), case["name"]
    assert torch.allclose(c, ref_c, atol=tol, rtol=0), case["name"]


def test_stats_match_float64_reference_serial():
    for case in CASES:
        _, ids = standardized_topk(case["full"], case["k"], eps=EPS, vocab_size=case["vocab"])
        logp, d, c = topk_logprob_stats(case["full"], ids, eps=EPS, vocab_size=case["vocab"],
                                        chunk_tokens=3)
        _check(case, logp, d, c, ids)
    with pytest.raises(ValueError, match="do not match logits"):
        topk_logprob_stats(CASES[0]["full"], ids[:1], vocab_size=37)


def _rank_stats(rank, world, cases):
    import torch.distributed as dist

    groups = {4: dist.new_group([0, 1, 2, 3]), 2: [dist.new_group([0, 1]), dist.new_group([2, 3])]}
    out = {}
    for tp in (2, 4):
        group = groups[4] if tp == 4 else groups[2][rank // 2]
        r = rank % tp
        for case in cases:
            v_local = case["full"].shape[-1] // tp
            shard = case["full"][..., r * v_local:(r + 1) * v_local]
            _, ids = standardized_topk(shard, case["k"], eps=EPS, vocab_size=case["vocab"],
                                       tp_group=group)
            out[(tp, case["name"])] = (ids, *topk_logprob_stats(
                shard, ids, eps=EPS, vocab_size=case["vocab"], tp_group=group, chunk_tokens=4))
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


@pytest.mark.dist
def test_stats_match_float64_reference_tp2_tp4():
    per_rank = [torch.load(io.BytesIO(p)) for p in run_on_ranks(_rank_stats, 4, args=(CASES,))]
    for tp in (2, 4):
        for case in CASES:
            got = [r[(tp, case["name"])] for r in per_rank]
            for other in got[1:]:       # replicated: every rank holds the same numbers
                assert all(torch.equal(a, b) for a, b in zip(got[0], other)), case["name"]
            ids, logp, d, c = got[0]
            _check(case, logp, d, c, ids)


# ------------------------------------------------------------------ shards: recovery and bytes
def _teacher_results(logits: torch.Tensor, aligned: torch.Tensor, k: int = K):
    """SampleTopK per row of ``logits [b, P, V]`` as compute_batch_topk makes them."""
    values, ids = standardized_topk(logits, k, eps=EPS)
    logp, d, c = topk_logprob_stats(logits, ids, eps=EPS)
    m = aligned
    return [SampleTopK(sid, torch.where(m[sid, :, None], values[sid], 0.0),
                       torch.where(m[sid, :, None], ids[sid], 0), m[sid], int(m[sid].sum()),
                       logits.shape[1], teacher_ce_byte=0.5 + sid,
                       logp=torch.where(m[sid, :, None], logp[sid], 0.0),
                       d=torch.where(m[sid], d[sid], 0.0), c=torch.where(m[sid], c[sid], 0.0))
            for sid in range(logits.shape[0])]


def _header(dtype=LOGP_DTYPE, k=K):
    return TopKHeader(teacher="t0", teacher_tokenizer_hash="a" * 64, pivot_tokenizer_hash="b" * 64,
                      k=k, dataset_hash="c" * 64, dtype=dtype)


def _write(path, results, dtype=LOGP_DTYPE):
    with TopKWriter(path, _header(dtype)) as w:
        for r in results:
            w.add(r.sample_id, r.values, r.ids, r.aligned_mask, teacher_ce_byte=r.teacher_ce_byte,
                  logprobs=(r.logp, r.d, r.c) if dtype == LOGP_DTYPE else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_recovered_logprobs_match_log_softmax(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    # 49k-sized vocab, peaked rows (a trained LM's top-1 far above the rest) and flat ones
    logits = torch.randn(3, 40, 49152, generator=g) * 2.5
    logits[:, :20, :7] += torch.linspace(18, 4, 7)
    logits = logits.to(dtype)
    aligned = torch.rand(3, 40, generator=g) < 0.8
    _write(tmp_path / "t0-00000.topk", _teacher_results(logits, aligned))
    teacher = OfflineTeacher("t0", str(tmp_path), {"teacher": "t0", "k": K}, require_logprobs=True)
    values, ids, got_aligned, ce, logp = teacher.fetch(torch.tensor([0, 1, 2]), 40)
    assert torch.equal(got_aligned, aligned) and logp.dtype == torch.float32
    ref = torch.log_softmax(logits.double(), -1).gather(-1, ids)
    m = aligned[..., None].expand_as(logp)
    err = (logp.double() - ref).abs()[m]
    assert err.max() <= LOGP_STEP / 2 + 1e-6 <= 1e-3, err.max()
    assert torch.all(logp[~m] == 0) and torch.all(values[~m] == 0)
    # the standardised values ULD / GLD read: those of standardized_topk to (step / 2) / d
    ref_a, ref_ids = standardized_topk(logits, K, eps=EPS)
    assert torch.equal(ids[m.view_as(ids)], ref_ids[m.view_as(ids)])
    d = topk_logprob_stats(logits, ref_ids, eps=EPS)[1]
    bound = (LOGP_STEP / 2 + 1e-6) / d[..., None].expand_as(logp)
    assert torch.all((values.double() - ref_a.double()).abs()[m] <= bound[m] + 1e-5)
    assert torch.equal(ce, torch.tensor([0.5, 1.5, 2.5]))


def test_bytes_per_aligned_position(tmp_path):
    s = 1000
    logits = torch.randn(1, s, 500, generator=torch.Generator().manual_seed(2))
    res = _teacher_results(logits, torch.ones(1, s, dtype=torch.bool))
    sizes = {}
    for dtype in (LOGP_DTYPE, "bfloat16"):
        p = tmp_path / f"{dtype}.topk"
        _write(p, res, dtype)
        h = read_topk_header(p)
        overhead = os.path.getsize(p) - h["payload_bytes"] + 40     # container + 1 index row
        sizes[dtype] = (os.path.getsize(p) - overhead) / s          # payload per position
    # 40 B ids + 8 B (d, c) + 20 B codes + 1 bit of mask per position (+ the sample's padding
    # to 8 B: 3 B here) = 68.128 B; format 3: 40 + 20 + 1 bit
    assert sizes[LOGP_DTYPE] == (68 * s + s // 8 + 3) / s == 68.128 and sizes[LOGP_DTYPE] <= 70
    assert sizes["bfloat16"] == (60 * s + s // 8 + 3) / s


def test_codes_and_clamping():
    lp = torch.tensor([0.0, -1e-9, -LOGP_STEP / 2 * 0.999, -1.0, -12.3456789, LOGP_MIN, -70.0],
                      dtype=F64)
    got = decode_logprobs(encode_logprobs(lp)).double()
    assert torch.all((got - lp.clamp(min=LOGP_MIN)).abs() <= LOGP_STEP / 2)
    assert got[-1] == LOGP_MIN and got[0] == 0
    assert encode_logprobs(lp).dtype == torch.int16
    with pytest.raises(ValueError, match="leading shape"):
        standardized_from_logprobs(got[None], torch.ones(2), torch.ones(1))


def test_clamped_logprobs_are_counted_in_the_header(tmp_path):
    logits = torch.zeros(1, 3, 100)
    logits[0, :, 0] = 90.0              # the other 99 entries sit at -90 nats: below LOGP_MIN
    res = _teacher_results(logits, torch.ones(1, 3, dtype=torch.bool))
    _write(tmp_path / "c.topk", res)
    assert read_topk_header(tmp_path / "c.topk")["meta"]["logp_clamped"] == 3 * (K - 1)
    _, _, _, logp = TopKReader(tmp_path).get(0, logprobs=True)
    assert torch.all(logp[:, 1:] == LOGP_MIN) and torch.all(logp[:, 0] == 0)


# ------------------------------------------------------------------ old shards, refusal, corruption
def test_old_shards_read_as_before_and_are_refused_when_logprobs_are_required(tmp_path):
    logits = torch.randn(2, 12, 300, generator=torch.Generator().manual_seed(4))
    aligned = torch.rand(2, 12, generator=torch.Generator().manual_seed(5)) < 0.7
    res = _teacher_results(logits, aligned)
    d = tmp_path / "old"
    _write(d / "t0-00000.topk", res, "bfloat16")
    assert (d / "t0-00000.topk").read_bytes()[8:12] == (3).to_bytes(4, "little")   # format 3
    teacher = OfflineTeacher("t0", str(d), {"teacher": "t0", "k": K})
    values, ids, got_aligned, ce, logp = teacher.fetch(torch.tensor([0, 1]), 12)
    assert logp is None
    for r in res:   # exactly the bf16 values, as format 3 has always read
        assert torch.equal(values[r.sample_id], r.values.to(torch.bfloat16).float())
        assert torch.equal(ids[r.sample_id], r.ids) and torch.equal(got_aligned[r.sample_id],
                                                                    r.aligned_mask)
    assert len(TopKReader(d).get(0)) == 3                            # as before without logprobs
    with pytest.raises(TeacherDataError) as e:
        OfflineTeacher("t0", str(d), {"teacher": "t0"}, require_logprobs=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"teacher t0: {d / 't0-00000.topk'}: no teacher "
                                              "log-probs") and "precompute-topk" in msg
    # a directory mixing the two formats is refused (one dtype per reader)
    _write(d / "t0-00001.topk", [SampleTopK(**{**r.__dict__, "sample_id": 9}) for r in res[:1]])
    with pytest.raises(TopKStoreError, match="'dtype' is 'logp16', the run expects 'bfloat16'"):
        TopKReader(d)
    with pytest.raises(ValueError, match="needs logprobs"):
        TopKWriter(tmp_path / "x.topk", _header()).add(0, None, res[0].ids, res[0].aligned_mask)
    with pytest.raises(ValueError, match="stores no log-probs"):
        TopKWriter(tmp_path / "x.topk", _header("bfloat16")).add(
            0, res[0].values, res[0].ids, res[0].aligned_mask, logprobs=(res[0].logp, res[0].d,
                                                                          res[0].c))


def test_flipped_logprob_code_fails_the_checksum(tmp_path):
    logits = torch.randn(1, 30, 300, generator=torch.Generator().manual_seed(6))
    res = _teacher_results(logits, torch.ones(1, 30, dtype=torch.bool))
    p = tmp_path / "t0-00000.topk"
    _write(p, res)
    raw = bytearray(p.read_bytes())
    # the last sample's codes end 4 B (mask bits) + padding + 32 B (trailer) before the end
    raw[len(raw) - 32 - 8 - 10] ^= 0x04
    p.write_bytes(bytes(raw))
    teacher = OfflineTeacher("t0", str(tmp_path), {"teacher": "t0"}, require_logprobs=True)
    with pytest.raises(TeacherDataError, match=r"t0-00000\.topk: checksum mismatch"):
        teacher.fetch(torch.tensor([0]), 30)


# ------------------------------------------------------------------ offline == online
def test_offline_and_online_payloads_are_identical(tmp_path):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 9, 700, generator=g) * 2).to(torch.bfloat16)
    aligned = torch.rand(3, 9, generator=g) < 0.75
    res = _teacher_results(logits, aligned)
    res[2] = SampleTopK(**{**res[2].__dict__, "ids": res[2].ids[:6], "aligned_mask":
                           res[2].aligned_mask[:6], "values": res[2].values[:6],
                           "logp": res[2].logp[:6], "d": res[2].d[:6], "c": res[2].c[:6]})
    _write(tmp_path / "t0-00000.topk", res)
    seq = 8       # cuts samples 0 and 1, pads sample 2
    off = OfflineTeacher("t0", str(tmp_path), {"teacher": "t0"}).fetch(torch.tensor([0, 1, 2]), seq)
    msg = topk_message(res, [0, 1, 2], seq, K, tokens=27, compute_s=0.1)
    header, codes, ids, al, ce, dc = msg
    assert (codes.dtype, ids.dtype, al.dtype, ce.dtype, dc.dtype) == (
        torch.int16, torch.int32, torch.uint8, torch.float32, torch.float32)
    # bytes on the wire per position: K codes + K ids + mask byte + (d, c)
    assert (codes[0, 0].nbytes + ids[0, 0].nbytes + al[0, 0].nbytes + dc[0, 0].nbytes) == 69
    on = (*decode_topk(codes, ids, al, dc)[:3], ce, decode_topk(codes, ids, al, dc)[3])
    for name, a, b in zip(("values", "ids", "aligned", "ce", "logp"), off, on):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with pytest.raises(ValueError, match="no teacher log-probs"):
        topk_message([SampleTopK(**{**res[0].__dict__, "logp": None})], [0], seq, K, 0, 0.0)


def test_synthetic_shards_with_logprobs(tmp_path):
    from tools.make_synthetic_topk import make_synthetic_fuse_data

    man = make_synthetic_fuse_data(tmp_path / "d", seq_len=48, samples=2, teachers=["t0"], k=4,
                                   vocab=300, logprobs=True)
    with pytest.warns(UserWarning, match="synthetic"):
        t = OfflineTeacher("t0", man["topk_dirs"]["t0"], {"teacher": "t0", "k": 4},
                           require_logprobs=True)
    ids = torch.tensor(t.reader.sample_ids)
    values, tids, aligned, ce, logp = t.fetch(ids, 48)
    lp, v = logp[aligned], values[aligned]
    assert lp.shape[0] > 40 and (lp <= 0).all() and (lp[:, :-1] >= lp[:, 1:]).all()
    assert (lp[:, 0] >= -2 - LOGP_STEP).all() and (lp[:, 0] <= -0.05 + LOGP_STEP).all()
    assert (v[:, :-1] >= v[:, 1:] - 1e-3).all() and v.isfinite().all()
    assert (logp[~aligned] == 0).all() and (values[~aligned] == 0).all()
