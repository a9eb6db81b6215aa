"""The online-teacher message protocol (megatron_fusion/teachers/online/) on 2 gloo ranks, no models.

Rank 0 is the student (an ``OnlineTeacher``), rank 1 a fake teacher that sends with the real
``_Sender`` / ``topk_message`` / ``error_message``. Each scenario gets its own bridge (a gloo group
over both ranks, as ``parallel._init_split`` builds it) and its own store namespace, so a timed-out
receive or a closed connection cannot leak into the next one. One launch runs every scenario
(~15 s); the tests below assert on what each rank returned:

- round trip: values (bf16 on the wire, float32 out), ids, aligned mask and teacher CE (NaN kept)
  arrive as sent, truncated / padded to seq; ``pop_metrics`` gives the wait and
  tokens / compute seconds, then resets;
- a fingerprint mismatch, a hung teacher (``fuse.timeout_s``), a teacher's ERROR message, a
  teacher that posted its error in the store and died or went silent, a teacher that died
  without a word: each is one user-facing line naming the teacher;
- ``_Sender`` keeps ``prefetch`` micro-batches in flight, and ``drain`` returns when the student
  has gone or the timeout passes;
- ``student_receivers`` against Megatron's own rank order, fingerprints through int64.

    .venv/bin/python -m pytest -q tests/teachers/test_online_protocol.py
"""

from __future__ import annotations

import datetime
import gc
import math
import time
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_fusion.teachers.online.client import OnlineTeacher
from megatron_fusion.teachers.online.protocol import (batch_fingerprint, error_key, error_message,
                                                      fingerprint_to_int, int_to_fingerprint,
                                                      student_receivers, topk_message)
from megatron_fusion.teachers.online.server import _Sender
from megatron_fusion.parallel import TeacherGroupSpec, WorldSplit
from megatron_fusion.teachers.topk import SampleTopK
from megatron_fusion.local_ranks import run_on_ranks

pytestmark = pytest.mark.dist

NAME = "tA"
SPEC = TeacherGroupSpec(NAME, first=1, ranks=1, tp=1)    # launch rank 1 is the whole teacher
TAG = 0                                                   # teacher index 0 in the split
SEQ, K = 6, 3
TIMEOUT_S = 2.0            # fuse.timeout_s of the hung-teacher scenario
LONG_TIMEOUT_S = 20.0      # where a failure must come from a closed connection, not the timeout
PREFETCH_DELAY_S = 1.0     # the student starts receiving this late in the prefetch scenario
DRAIN = datetime.timedelta(seconds=10)  # a teacher never waits longer on a student that failed
KEPT = "; the last checkpoint is kept"


# --- data both sides (and the parent) rebuild identically ---------------------------------------

def _ids_with_top_bit(start: int, n: int) -> list[int]:
    """``n`` consecutive sample ids from ``start`` on whose fingerprint has the top bit set (so
    the header carries a negative int64)."""
    while batch_fingerprint(torch.arange(start, start + n))[0] < "8":
        start += 1
    return list(range(start, start + n))


BATCH_A = _ids_with_top_bit(10, 2)
BATCH_B = _ids_with_top_bit(50, 1)


def _records(sample_ids: list[int], lengths: list[int], ces: list[float]) -> list[SampleTopK]:
    """SampleTopK-like teacher results: float64 log-probs (not on the 2^-10 grid), d, c, the
    values they give, ids, aligned mask."""
    g = torch.Generator().manual_seed(sum(sample_ids))
    out = []
    for sid, p, ce in zip(sample_ids, lengths, ces):
        aligned = torch.rand(p, generator=g) > 0.3                         # [P]
        logp = -(torch.rand(p, K, generator=g, dtype=torch.float64) * 9).sort(-1).values
        d = 1.5 + torch.rand(p, generator=g, dtype=torch.float64)          # [P]
        c = -5 - torch.rand(p, generator=g, dtype=torch.float64)           # [P]
        m = aligned[:, None]
        values = torch.where(m, (logp - c[:, None]) / d[:, None], 0.0).float()   # [P, K]
        ids = torch.randint(0, 50_000, (p, K), generator=g)                # [P, K] int64
        out.append(SampleTopK(sid, values, ids, aligned, n_response=int(aligned.sum()),
                              teacher_tokens=p + 2, teacher_ce=2 * ce, teacher_ce_byte=ce,
                              logp=torch.where(m, logp, 0.0), d=torch.where(aligned, d, 0.0),
                              c=torch.where(aligned, c, 0.0)))
    return out


def _round_trip_batches():
    """(sample ids, records, teacher tokens, compute s) per micro-batch: one sample longer than
    SEQ (truncated), one shorter (padded), NaN CE (no response token in the teacher's window)."""
    return [(BATCH_A, _records(BATCH_A, [SEQ + 3, SEQ - 2], [float("nan"), 1.25]), 120, 0.5),
            (BATCH_B, _records(BATCH_B, [SEQ], [0.75]), 30, 0.25)]


def _expected(records: list[SampleTopK]):
    """What the student must get for ``records``: log-probs on the 2^-10 grid of the 16-bit
    code, values ``(log p - c) / d`` from them and float32 ``d``, ``c`` (as a format-4 shard)."""
    b = len(records)
    values, ids = torch.zeros(b, SEQ, K), torch.zeros(b, SEQ, K, dtype=torch.long)
    logp = torch.zeros(b, SEQ, K)
    aligned = torch.zeros(b, SEQ, dtype=torch.bool)
    for r, st in enumerate(records):
        n = min(st.values.shape[0], SEQ)
        m = st.aligned_mask[:n]
        q = torch.round(-st.logp[:n] * 1024) / -1024                         # the grid
        d = torch.where(m, st.d[:n].float().double(), 1.0)                  # float32 d, c
        a = (q - st.c[:n].float().double()[:, None]) / d[:, None]
        values[r, :n] = torch.where(m[:, None], a.float(), 0.0)
        logp[r, :n] = torch.where(m[:, None], q.float(), 0.0)
        ids[r, :n] = st.ids[:n]
        aligned[r, :n] = m
    ce = torch.tensor([st.teacher_ce_byte for st in records])               # per byte
    return values, ids, aligned, ce, logp


# --- scenarios: (student on rank 0, teacher on rank 1) ------------------------------------------

def _online(box, store, timeout_s=TIMEOUT_S) -> OnlineTeacher:
    split = WorldSplit(world=2, rank=0, student=1, teachers=(SPEC,), bridge=box[0], store=store)
    return OnlineTeacher(NAME, TAG, split, SPEC, dp_rank=0, timeout_s=timeout_s)


def _failure(fn) -> dict:
    """Run ``fn`` expecting it to raise: the exception's type name, message and the time taken."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:
        return {"type": type(e).__name__, "msg": str(e), "elapsed": time.perf_counter() - t0}
    return {"type": None, "msg": "no error", "elapsed": time.perf_counter() - t0}


def _close(box) -> None:
    """Drop this rank's bridge: its connections close, as when the process dies."""
    box.clear()
    gc.collect()


def student_round_trip(box, store):
    t = _online(box, store)
    got = [t.fetch(torch.tensor(ids), SEQ) for ids, *_ in _round_trip_batches()]
    return {"got": got, "metrics": t.pop_metrics(), "metrics_after_pop": t.pop_metrics()}


def teacher_round_trip(box, store):
    sender = _Sender(box[0], TAG, prefetch=2, name=NAME)
    for ids, recs, tokens, compute_s in _round_trip_batches():
        sender.send([0], topk_message(recs, ids, SEQ, K, tokens, compute_s))
    sender.drain(DRAIN)
    return {"student_gone": sender.student_gone}


def student_fingerprint_mismatch(box, store):
    t = _online(box, store)
    return _failure(lambda: t.fetch(torch.tensor([1, 2]), SEQ))


def teacher_fingerprint_mismatch(box, store):
    sender = _Sender(box[0], TAG, prefetch=2, name=NAME)
    sender.send([0], topk_message(_records([7, 8], [SEQ, SEQ], [1.0, 1.0]), [7, 8], SEQ, K, 10, 0.1))
    sender.drain(DRAIN)


def student_hung(box, store):
    t = _online(box, store, TIMEOUT_S)
    return _failure(lambda: t.fetch(torch.tensor([1, 2]), SEQ))


def teacher_hung(box, store):
    time.sleep(TIMEOUT_S + 0.2)  # sends nothing, then exits cleanly


def student_error_message(box, store):
    t = _online(box, store)
    return _failure(lambda: t.fetch(torch.tensor([1, 2]), SEQ))


def teacher_error_message(box, store):
    sender = _Sender(box[0], TAG, prefetch=2, name=NAME)
    sender.send([0], error_message("ValueError: boom"))
    sender.drain(DRAIN)


def student_posted_then_dead(box, store):
    t = _online(box, store, LONG_TIMEOUT_S)
    return _failure(lambda: t.fetch(torch.tensor([1, 2]), SEQ))


def teacher_posted_then_dead(box, store):
    store.set(error_key(NAME), "(launch rank 1) ValueError: boom")
    _close(box)


def student_posted_then_silent(box, store):
    t = _online(box, store, 1.0)
    return _failure(lambda: t.fetch(torch.tensor([1, 2]), SEQ))


def teacher_posted_then_silent(box, store):
    store.set(error_key(NAME), "(launch rank 1) ValueError: boom")
    time.sleep(1.2)          # silent past the student's 1 s timeout, then exits cleanly


def student_dead_no_post(box, store):
    t = _online(box, store, LONG_TIMEOUT_S)
    return _failure(lambda: t.fetch(torch.tensor([1, 2]), SEQ))


def teacher_dead_no_post(box, store):
    _close(box)


def _mb(i: int):
    return [i], topk_message(_records([i], [SEQ], [1.0]), [i], SEQ, K, 10, 0.1)


def student_prefetch(box, store):
    t = _online(box, store, LONG_TIMEOUT_S)
    time.sleep(PREFETCH_DELAY_S)
    fetch_start = time.time()                    # wall clock: compared with the teacher's
    for i in range(3):
        t.fetch(torch.tensor(_mb(i)[0]), SEQ)     # raises on a fingerprint mismatch
    return {"received": 3, "fetch_start": fetch_start}


def teacher_prefetch(box, store):
    sender = _Sender(box[0], TAG, prefetch=2, name=NAME)
    sent_at, pending = [], []
    for i in range(3):
        sender.send([0], _mb(i)[1])
        sent_at.append(time.time())
        pending.append(len(sender.pending))
    sender.drain(DRAIN)
    return {"sent_at": sent_at, "pending": pending, "pending_after_drain": len(sender.pending),
            "student_gone": sender.student_gone}


def student_drain_gone(box, store):
    store.get("posted")          # the teacher has 2 micro-batches in flight
    _close(box)
    store.set("closed", "1")


def teacher_drain_gone(box, store):
    sender = _Sender(box[0], TAG, prefetch=2, name=NAME)
    for i in range(2):
        sender.send([0], _mb(i)[1])
    store.set("posted", "1")
    store.get("closed")
    t0 = time.perf_counter()
    sender.drain()               # no timeout: must return because the student has gone
    return {"elapsed": time.perf_counter() - t0, "student_gone": sender.student_gone,
            "pending": len(sender.pending)}


def student_drain_timeout(box, store):
    store.get("drained")         # alive, but never receives


def teacher_drain_timeout(box, store):
    sender = _Sender(box[0], TAG, prefetch=2, name=NAME)
    sender.send([0], _mb(0)[1])
    t0 = time.perf_counter()
    sender.drain(datetime.timedelta(seconds=0.5))
    store.set("drained", "1")
    return {"elapsed": time.perf_counter() - t0, "student_gone": sender.student_gone,
            "pending": len(sender.pending)}


def student_send_after_gone(box, store):
    t = _online(box, store, LONG_TIMEOUT_S)
    t.fetch(torch.tensor(_mb(0)[0]), SEQ)
    del t
    _close(box)                  # the student stops (e.g. it failed) after one micro-batch
    store.set("closed", "1")


def teacher_send_after_gone(box, store):
    sender = _Sender(box[0], TAG, prefetch=1, name=NAME)
    sender.send([0], _mb(0)[1])
    store.get("closed")
    time.sleep(0.3)              # the teacher computes the next micro-batches meanwhile
    raised = None
    try:
        for i in (1, 2):
            sender.send([0], _mb(i)[1])
    except RuntimeError as e:
        raised = str(e).splitlines()[0][:200]
    t0 = time.perf_counter()
    sender.drain()
    return {"raised": raised, "student_gone": sender.student_gone,
            "drain_s": time.perf_counter() - t0}


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 3, 2), (2, 2, 3),
           (4, 2, 2)]   # (tp, pp, dp)


def student_megatron_rank_order(box, store):
    """Per layout, per DP rank: the last pipeline stage's ranks in TP order, from megatron-core's
    own RankGenerator (order tp-cp-ep-dp-pp). Computed here, where Megatron is already imported
    (CPU mode), not in the pytest process (~4 s of import)."""
    from megatron.core.parallel_state import RankGenerator

    out = {}
    for tp, pp, dp in LAYOUTS:
        gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        coord = {}                 # launch rank -> {"tp": tp_rank, "dp": dp_rank, "pp": pp_rank}
        for axis in ("tp", "dp", "pp"):
            for group in gen.get_ranks(axis):
                for i, r in enumerate(group):
                    coord.setdefault(r, {})[axis] = i
        out[(tp, pp, dp)] = [
            [r for _, r in sorted((c["tp"], r) for r, c in coord.items()
                                  if c["dp"] == d and c["pp"] == pp - 1)] for d in range(dp)]
    return out


def teacher_megatron_rank_order(box, store):
    return None


SCENARIOS = ("round_trip", "fingerprint_mismatch", "hung", "error_message", "posted_then_dead",
             "posted_then_silent", "dead_no_post", "prefetch", "drain_gone", "drain_timeout",
             "send_after_gone", "megatron_rank_order")


def protocol_ranks(rank, world):
    """Every scenario in turn, each on a fresh bridge and store namespace; {scenario: result}."""
    from torch.distributed.distributed_c10d import _get_default_store

    launch_store = _get_default_store()
    out = {}
    for name in SCENARIOS:
        # as parallel._init_split: a gloo group over all ranks, the store under a prefix
        box = [dist.ProcessGroupGloo(dist.PrefixStore(f"bridge/{name}/", launch_store), rank,
                                     world, datetime.timedelta(seconds=30))]
        store = dist.PrefixStore(f"online/{name}/", launch_store)
        fn = globals()[f"{'student' if rank == 0 else 'teacher'}_{name}"]
        try:
            out[name] = fn(box, store)
        except Exception:  # reported by that scenario's test; the other scenarios still run
            out[name] = {"crash": traceback.format_exc()}
        _close(box)
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def ranks():
    student, teacher = run_on_ranks(protocol_ranks, 2, timeout_s=120)
    return student, teacher


def _result(ranks, name):
    student, teacher = (r[name] for r in ranks)
    for side, res in (("student", student), ("teacher", teacher)):
        if isinstance(res, dict) and "crash" in res:
            pytest.fail(f"{name}: the {side} rank raised:\n{res['crash']}")
    return student, teacher


# --- tests -------------------------------------------------------------------------------------

def test_round_trip_values_ids_mask_ce_and_metrics(ranks):
    student, teacher = _result(ranks, "round_trip")
    for (ids, recs, *_), got in zip(_round_trip_batches(), student["got"]):
        values, t_ids, aligned, ce, logp = got
        assert (values.dtype, t_ids.dtype, aligned.dtype, ce.dtype, logp.dtype) == (
            torch.float32, torch.int64, torch.bool, torch.float32, torch.float32)
        want = _expected(recs)
        assert values.shape == (len(ids), SEQ, K) and aligned.shape == (len(ids), SEQ)
        torch.testing.assert_close(values, want[0], rtol=0, atol=0)
        torch.testing.assert_close(logp, want[4], rtol=0, atol=0)
        assert torch.equal(t_ids, want[1]) and torch.equal(aligned, want[2])
        torch.testing.assert_close(ce, want[3], rtol=0, atol=0, equal_nan=True)
    # the 16-bit wire code really rounds (else this test would not tell float32 from it)
    sent = _round_trip_batches()[0][1][0].logp[:SEQ].float()               # [SEQ, K]
    assert not torch.equal(student["got"][0][4][0], sent)
    assert math.isnan(student["got"][0][3][0].item())
    m = student["metrics"]
    assert 0 <= m["wait_s"] < 10
    assert m["tokens_per_s"] == pytest.approx((120 + 30) / (0.5 + 0.25))
    assert student["metrics_after_pop"] == {"wait_s": 0.0, "tokens_per_s": 0.0}
    assert teacher["student_gone"] is False


def test_fingerprint_mismatch_names_teacher_and_both_batches(ranks):
    student, _ = _result(ranks, "fingerprint_mismatch")
    assert student["type"] == "TeacherDataError", student
    msg = student["msg"]
    assert msg.startswith(f"teacher {NAME}: top-K for batch ") and "fingerprint mismatch" in msg
    assert batch_fingerprint(torch.tensor([7, 8])) in msg      # what the teacher sent
    assert batch_fingerprint(torch.tensor([1, 2])) in msg      # what the student expected


def test_hung_teacher_times_out_with_its_name_and_the_setting(ranks):
    student, _ = _result(ranks, "hung")
    assert student["type"] == "TeacherFailedError", student
    assert student["msg"] == (f"teacher {NAME}: no top-K from its launch rank 1 within "
                              f"fuse.timeout_s=2s (teacher hung or dead){KEPT}")
    assert TIMEOUT_S - 0.05 <= student["elapsed"] <= TIMEOUT_S + 1.5, student["elapsed"]


def test_teacher_error_message_is_reported(ranks):
    student, _ = _result(ranks, "error_message")
    assert student["type"] == "TeacherFailedError", student
    assert student["msg"] == f"teacher {NAME} failed: ValueError: boom{KEPT}"


@pytest.mark.parametrize("case", ["posted_then_dead", "posted_then_silent"])
def test_error_posted_in_store_is_what_the_student_reports(ranks, case):
    # dead: the teacher's connections close (receive fails at once); silent: the receive times out
    student, _ = _result(ranks, case)
    assert student["type"] == "TeacherFailedError", student
    assert student["msg"] == f"teacher {NAME} failed: (launch rank 1) ValueError: boom{KEPT}"
    assert student["elapsed"] < (5 if case == "posted_then_dead" else 1.0 + 1.5)


def test_dead_teacher_without_message_names_its_rank(ranks):
    student, _ = _result(ranks, "dead_no_post")
    assert student["type"] == "TeacherFailedError", student
    msg = student["msg"]
    assert msg.startswith(f"teacher {NAME}: lost its launch rank 1 (") and msg.endswith(KEPT)
    assert "\n" not in msg     # gloo's reason (closed / reset by peer) cut to its first line
    assert student["elapsed"] < 5           # not the 20 s timeout


def test_sender_keeps_prefetch_microbatches_in_flight(ranks):
    student, teacher = _result(ranks, "prefetch")
    assert student["received"] == 3
    assert teacher["pending"] == [1, 2, 2]
    # the first two sends return before the student receives anything (it sleeps first); the
    # third waits until the student takes the first micro-batch (one clock: same machine)
    first, second, third = teacher["sent_at"]
    assert second < student["fetch_start"] <= third, (teacher["sent_at"], student["fetch_start"])
    assert teacher["pending_after_drain"] == 0 and teacher["student_gone"] is False


def test_drain_returns_when_the_student_has_gone(ranks):
    _, teacher = _result(ranks, "drain_gone")
    assert teacher["student_gone"] is True and teacher["pending"] == 0
    assert teacher["elapsed"] < 5, teacher


def test_drain_with_timeout_returns_on_a_student_that_does_not_receive(ranks):
    _, teacher = _result(ranks, "drain_timeout")
    assert teacher["student_gone"] is True and teacher["pending"] == 0
    assert 0.45 <= teacher["elapsed"] < 3, teacher


def test_send_after_the_student_has_gone_sets_student_gone_without_raising(ranks):
    _, teacher = _result(ranks, "send_after_gone")
    assert teacher["raised"] is None, teacher["raised"]
    assert teacher["student_gone"] is True and teacher["drain_s"] < 5


# --- pure functions ----------------------------------------------------------------------------

def test_student_receivers_follow_megatron_rank_order(ranks):
    # pure function; the reference comes from megatron-core's RankGenerator, run in the launch
    student, _ = _result(ranks, "megatron_rank_order")
    assert sorted(student) == sorted(LAYOUTS)
    for (tp, pp, dp), per_dp in student.items():
        cfg = SimpleNamespace(parallel=SimpleNamespace(tp=tp, pp=pp))
        for d, want in enumerate(per_dp):
            assert student_receivers(cfg, dp, d) == want, (tp, pp, dp, d)


@pytest.mark.parametrize("fp", ["0000000000000000", "0000000000000001", "7fffffffffffffff",
                                "8000000000000000", "ffffffffffffffff", "a3c1f0e2d4b59687"])
def test_fingerprint_int64_round_trip(fp):
    v = fingerprint_to_int(fp)
    assert -(1 << 63) <= v < (1 << 63) and (v < 0) == (int(fp, 16) >= 1 << 63)
    wire = torch.tensor([v], dtype=torch.long).tolist()[0]     # as in the int64 header
    assert int_to_fingerprint(wire) == fp


def test_real_fingerprints_with_the_top_bit_set_round_trip():
    for ids in (BATCH_A, BATCH_B):
        fp = batch_fingerprint(torch.tensor(ids))
        assert fp[0] >= "8" and fingerprint_to_int(fp) < 0
        assert int_to_fingerprint(fingerprint_to_int(fp)) == fp
