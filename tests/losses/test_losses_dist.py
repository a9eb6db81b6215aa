"""Fusion losses under tensor parallelism (TP 2 and 4 on gloo ranks) against the serial float64
reference of test_losses.py: forward and gradient of every function, uneven vocab (padding), masks,
exact ties, bf16, k larger than a shard, all-masked, a rank holding only padding; the fused
CE + top-K Function against the separate Functions under TP; -token_logprobs against
megatron-core's vocab_parallel_cross_entropy; and the communication contract (every collective
recorded with its size). One launch per TP size runs all checks (~10 s each).

    .venv/bin/python -m pytest -q tests/losses/test_losses_dist.py
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist

from megatron_fusion.local_ranks import run_on_ranks

try:   # tests/ may or may not be a package (an __init__.py changes the import name)
    from tests.losses.test_losses import (F64, assert_fused_equals_separate, assert_matches,
                                   fused_and_separate, make_case, ours, reference)
except ImportError:
    from test_losses import (F64, assert_fused_equals_separate, assert_matches, fused_and_separate,
                             make_case, ours, reference)

pytestmark = pytest.mark.dist

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
                "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv")


class CommRecorder:
    """Wraps torch.distributed collectives; records (name, input numel, input bytes, dtype)."""

    def __init__(self):
        self.calls: list[tuple[str, int, int, str]] = []
        self._orig = {}

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            # the tensor this rank contributes: all_reduce(t), all_gather*(out, inp), ...
            idx = 0 if name in ("all_reduce", "broadcast", "reduce", "send", "isend", "recv",
                                "irecv") else 1
            t = args[idx] if len(args) > idx else next(iter(kwargs.values()))
            if isinstance(t, (list, tuple)):
                t = t[0]
            self.calls.append((name, t.numel(), t.numel() * t.element_size(), str(t.dtype)))
            return fn(*args, **kwargs)
        return wrapper

    def __enter__(self):
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                self._orig[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._orig[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _comm_checks(tp_group, rank, world, b=2, s=3, v_local=64, k=4):
    """Forward and backward of every function under the recorder; returns {name: (fwd, bwd)}."""
    from megatron_fusion.losses import (cross_entropy_and_topk, distributed_topk, gld_loss,
                                        sequence_logprobs, standardized_topk, token_logprobs,
                                        uld_loss)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(b, s, v_local * world, generator=g)
    t_vals = torch.randn(b, s, k, generator=g)
    t_ids = torch.randint(0, 100, (b, s, k), generator=g)
    mask = torch.ones(b, s)
    labels = torch.randint(0, v_local * world - 5, (b, s), generator=g)
    kw = dict(vocab_size=v_local * world - 5, tp_group=tp_group)
    fns = {
        "distributed_topk": lambda x: distributed_topk(x, k, **kw)[0].sum(),
        "standardized_topk": lambda x: standardized_topk(x, k, **kw)[0].sum(),
        "uld_full": lambda x: uld_loss(x, t_vals, mask, k=k, **kw)[0],
        "uld_topk": lambda x: uld_loss(x, t_vals, mask, k=k, zscore="topk", **kw)[0],
        "gld": lambda x: gld_loss(x, t_vals, t_ids, mask, k=k, **kw)[0],
        "token_logprobs": lambda x: token_logprobs(x, labels, **kw).sum(),
        "sequence_logprobs": lambda x: sequence_logprobs(x, labels, mask, **kw)[0].sum(),
        "chunked_uld": lambda x: uld_loss(x, t_vals, mask, k=k, chunk_tokens=1, **kw)[0],
        "cross_entropy_and_topk": lambda x: sum(
            (o * torch.rand(o.shape, generator=g)).sum()
            for o in cross_entropy_and_topk(x, labels, k, **kw)[:3]),
        "fusion_fused": lambda x: _fused_fusion_loss(
            cross_entropy_and_topk(x, labels, k, chunk_tokens=2, **kw), t_vals, t_ids, mask, k),
    }
    out = {}
    for name, fn in fns.items():
        x = full[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
        with CommRecorder() as rec:
            loss = fn(x)
            fwd = rec.take()
            loss.backward()
            bwd = rec.take()
        out[name] = (fwd, bwd)
    return dict(comm=out, n_tokens=b * s, v_local=v_local, k=k)


def _fused_fusion_loss(out, t_vals, t_ids, mask, k):
    """The fusion stage's loss on the fused outputs: ULD and GLD add no collective."""
    from megatron_fusion.losses import gld_loss, uld_loss

    u, _ = uld_loss(None, t_vals, mask, k=k, student_topk=out.std_topk)
    ut, _ = uld_loss(None, t_vals, mask, k=k, zscore="topk", student_topk=out.raw_topk)
    gl, _ = gld_loss(None, t_vals, t_ids, mask, k=k, student_topk=out.std_topk)
    return (out.ce * mask).sum() + u + ut + 0.5 * gl


def _rank_checks(rank, world, cases):
    from megatron.core import tensor_parallel
    from megatron_fusion.parallel import init_student_groups

    groups = init_student_groups(tp=world)
    tp = groups.tp
    result = {"cases": {}}
    for i, case in enumerate(cases):
        v_local = case["full"].shape[-1] // world
        shard = case["full"][..., rank * v_local:(rank + 1) * v_local]
        # alternate the chunking so that both the one-chunk and the many-chunk paths run under TP
        result["cases"][case["name"]] = ours(shard, case, tp_group=tp,
                                             chunk_tokens=None if i % 2 else 2)
    result["fused_vs_separate"] = {}
    for i, case in enumerate(cases):
        v_local = case["full"].shape[-1] // world
        shard = case["full"][..., rank * v_local:(rank + 1) * v_local]
        result["fused_vs_separate"][case["name"]] = fused_and_separate(
            shard, case, tp_group=tp, chunk_tokens=2 if i % 2 else None)
    # -token_logprobs == megatron-core's vocab_parallel_cross_entropy (no padding; it takes [s, b, v])
    from megatron_fusion.losses import token_logprobs
    g = torch.Generator().manual_seed(1)
    full = torch.randn(3, 4, 16 * world, generator=g)
    labels = torch.randint(0, 16 * world, (3, 4), generator=g)
    wl = torch.randn(3, 4, generator=g)
    shard = full[..., rank * 16:(rank + 1) * 16]
    x1 = shard.clone().requires_grad_()
    ours_ce = -token_logprobs(x1, labels, tp_group=tp)
    (ours_ce * wl).sum().backward()
    x2 = shard.clone().requires_grad_()
    mcore_ce = tensor_parallel.vocab_parallel_cross_entropy(x2.transpose(0, 1).contiguous(),
                                                            labels.transpose(0, 1).contiguous()
                                                            ).transpose(0, 1)
    (mcore_ce * wl).sum().backward()
    result["ce"] = (ours_ce.detach(), mcore_ce.detach(), x1.grad, x2.grad)
    result.update(_comm_checks(tp, rank, world))
    # return plain bytes: many tensors through torch.multiprocessing's queue travel as shared-memory
    # file descriptors, which are gone once the rank exits before the parent reads them
    buf = io.BytesIO()
    torch.save(result, buf)
    return buf.getvalue()


def _cases(world):
    padded = 40 if world == 2 else 48
    v_local = padded // world
    return [
        make_case("f64_padded", dtype=F64, vocab_size=37, padded=padded, k=5),
        make_case("f64_k_gt_shard", dtype=F64, vocab_size=37, padded=padded, k=v_local + 3, seed=5),
        make_case("ties_f32", dtype=torch.float32, vocab_size=37, padded=padded, k=7, ties=True,
                  seed=1),
        make_case("bf16", dtype=torch.bfloat16, vocab_size=37, padded=padded, k=5, seed=2,
                  temperature=2.0),
        make_case("f32_all_masked", dtype=torch.float32, vocab_size=37, padded=padded, k=5, seed=4,
                  all_masked=True),
        # vocab 30 in 48 columns: at TP 4 the last rank holds padding only
        make_case("f64_padding_rank", dtype=F64, vocab_size=30, padded=48, k=8, seed=6),
        make_case("ties_f64_shard_edges", dtype=F64, vocab_size=37, padded=padded, k=9, ties=True,
                  seed=7),
    ]


_RESULTS: dict[int, tuple] = {}


def _launch(world):
    if world not in _RESULTS:
        cases = _cases(world)
        packed = run_on_ranks(_rank_checks, world, args=(cases,))
        _RESULTS[world] = (cases, [torch.load(io.BytesIO(p), weights_only=False) for p in packed])
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_serial_reference(world):
    cases, per_rank = _launch(world)
    for case in cases:
        ranks = [r["cases"][case["name"]] for r in per_rank]
        names = ranks[0].keys()
        for name in names:   # every TP rank holds the same replicated outputs
            for other in ranks[1:]:
                for a, b in zip(ranks[0][name][0], other[name][0]):
                    assert torch.equal(a, b), f"{case['name']}/{name}: ranks disagree"
        got = {n: ranks[0][n][0] for n in names}
        grads = {n: torch.cat([r[n][1] for r in ranks], dim=-1) for n in names}
        assert_matches(case, got, grads, reference(case))


@pytest.mark.parametrize("world", [2, 4])
def test_fused_ce_topk_equals_separate_path_under_tp(world):
    """cross_entropy_and_topk under TP == the three separate Functions under TP (forward and the
    fusion loss's gradient; CE and moments go through one float64 all-reduce instead of three, so
    forward values agree to rounding rather than bit for bit)."""
    cases, per_rank = _launch(world)
    for case in cases:
        ranks = [r["fused_vs_separate"][case["name"]] for r in per_rank]
        for other in ranks[1:]:
            for a, b in zip(ranks[0]["fused"][0], other["fused"][0]):
                assert torch.equal(a, b), f"{case['name']}: ranks disagree"
        res = {path: (ranks[0][path][0], ranks[0][path][1],
                      torch.cat([r[path][2] for r in ranks], dim=-1))
               for path in ("fused", "separate")}
        assert_fused_equals_separate(res, case, exact=False)


@pytest.mark.parametrize("world", [2, 4])
def test_token_logprobs_equals_megatron_vocab_parallel_cross_entropy(world):
    _, per_rank = _launch(world)
    for r in per_rank:
        ours_ce, mcore_ce, g_ours, g_mcore = r["ce"]
        torch.testing.assert_close(ours_ce, mcore_ce, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_ours, g_mcore, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_communication_contract(world):
    _, per_rank = _launch(world)
    for r in per_rank:
        n_tok, v_local, k = r["n_tokens"], r["v_local"], r["k"]
        for name, (fwd, bwd) in r["comm"].items():
            assert bwd == [], f"{name}: backward communicates: {bwd}"
            gathers = [c for c in fwd if c[0].startswith("all_gather")]
            reduces = [c for c in fwd if c[0] == "all_reduce"]
            assert len(gathers) + len(reduces) == len(fwd), f"{name}: unexpected {fwd}"
            for c in fwd:   # nothing of vocabulary size: at most k values (8 B each) per token
                assert c[1] <= n_tok * max(k, 4) < n_tok * v_local, f"{name}: {c}"
            if name in ("cross_entropy_and_topk", "fusion_fused"):
                # CE + z-scored top-K (+ ULD + GLD): ONE all-gather of k keys and ONE float64
                # all-reduce of 4 scalars (sum-exp, target, sum z, sum z^2) per token, i.e. 2 per
                # loss it serves; the separate path needs 1 all-gather + 3 all-reduces (1+2+2)
                assert [c[1:] for c in gathers] == [(n_tok * k, n_tok * k * 8, "torch.int64")], \
                    (name, gathers)
                assert [c[1:] for c in reduces] == [(4 * n_tok, 32 * n_tok, "torch.float64")], \
                    (name, reduces)
                continue
            # at most 3 all-reduces of at most 2 scalars per token per loss
            assert len(reduces) <= 3 and all(c[1] <= 2 * n_tok for c in reduces), (name, reduces)
            if name in ("token_logprobs", "sequence_logprobs"):
                assert gathers == []
                assert [c[1] for c in reduces] == [n_tok, 2 * n_tok], (name, reduces)
            else:
                # exactly ONE all-gather: k candidates per token per rank (k*tp gathered),
                # packed as one int64 (fp32 value + 32-bit id) = 8 bytes per candidate
                assert len(gathers) == 1, (name, gathers)
                assert gathers[0][1:] == (n_tok * k, n_tok * k * 8, "torch.int64"), gathers
                n_reduce = 0 if name in ("distributed_topk", "uld_topk") else 1
                # the z-score: one all-reduce of two float64 moments per token
                assert [c[1:] for c in reduces] == [(2 * n_tok, 16 * n_tok, "torch.float64")] * n_reduce, \
                    (name, reduces)
