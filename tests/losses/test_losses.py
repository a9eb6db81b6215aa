"""Fusion losses, single process: a plain float64 full-vocab reference (written here, autograd
does the gradients), the serial path (tp_group=None) against it, gradcheck, closed forms, and the
Gromov-Wasserstein guarantee of GLD. The TP 2/4 comparisons are in test_losses_dist.py and reuse
the reference and the cases built here; FPO and the teacher weights are in test_fpo_loss.py.

    .venv/bin/python -m pytest -q tests/losses/test_losses.py
"""

from __future__ import annotations

import pytest
import torch

from megatron_fusion.losses import (
    cross_entropy_and_topk, distributed_topk, eccentricity, gld_from_topk, gld_loss,
    sequence_logprobs, standardized_topk, token_logprobs, uld_from_topk, uld_loss, wasserstein_1d,
)

F64 = torch.float64


# ============================================================ plain float64 reference
def ref_zscore(z, eps):
    """z: [b, s, V] true vocab -> full-vocab z-score (population std)."""
    mu = z.mean(-1, keepdim=True)
    sigma = ((z - mu) ** 2).mean(-1, keepdim=True).sqrt()
    return (z - mu) / (sigma + eps)


def ref_topk(z, k):
    """Descending, ties to the lower id: a stable sort keeps equal values in id order."""
    vals, ids = torch.sort(z, dim=-1, descending=True, stable=True)
    return vals[..., :k], ids[..., :k]


def ref_standardized_topk(z, k, eps=1e-6):
    return ref_topk(ref_zscore(z, eps), k)


def ref_within_k(a, eps):
    """Within-K z-score. Where all K values tie (sigma = 0) the derivative through sigma is taken
    as 0 (the convention of the implementation; sqrt has none there)."""
    mu = a.mean(-1, keepdim=True)
    var = ((a - mu) ** 2).mean(-1, keepdim=True)
    sigma = torch.where(var > 0, torch.where(var > 0, var, 1.0).sqrt(), 0.0)
    return (a - mu) / (sigma + eps)


def ref_uld(z, teacher_values, mask, k, temperature=1.0, eps=1e-6, zscore="full"):
    if zscore == "full":
        a_s, a_t = ref_standardized_topk(z, k, eps)[0], teacher_values
    else:
        a_s, a_t = ref_within_k(ref_topk(z, k)[0], eps), ref_within_k(teacher_values, eps)
    total = z.sum() * 0
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            if mask[b, t] > 0:
                p_s = torch.softmax(a_s[b, t] / temperature, -1)
                p_t = torch.softmax(a_t[b, t] / temperature, -1)
                total = total + (p_s - p_t).abs().sum()
    return total, int((mask > 0).sum())


def ref_graph(values, ids, positions):
    """Dense co-activation graph C [n, n] of one sequence over the given positions."""
    nodes = sorted({int(i) for t in positions for i in ids[t]})
    col = {u: j for j, u in enumerate(nodes)}
    rows = []
    for t in positions:
        row = values.new_zeros(len(nodes))
        for v, i in zip(values[t], ids[t]):
            row = row + v * torch.nn.functional.one_hot(torch.tensor(col[int(i)]), len(nodes)).to(values.dtype)
        rows.append(row)
    a = torch.stack(rows)                                            # [|R|, n]
    return a.T @ a / len(positions)


def ref_w1(x, y):
    """W1 = integral |F_x - F_y| over the sorted union of the support (CDF form)."""
    pts = torch.sort(torch.cat([x, y])).values
    total = x.new_zeros(())
    for i in range(len(pts) - 1):
        fx = (x <= pts[i]).sum().to(x.dtype) / len(x)
        fy = (y <= pts[i]).sum().to(x.dtype) / len(y)
        total = total + (fx - fy).abs() * (pts[i + 1] - pts[i])
    return total


def ref_gld(z, teacher_values, teacher_ids, mask, k, eps=1e-6):
    a_s, ids_s = ref_standardized_topk(z, k, eps)
    total, count = z.sum() * 0, 0      # keeps the graph when nothing is masked in
    for b in range(z.shape[0]):
        pos = [t for t in range(z.shape[1]) if mask[b, t] > 0]
        if not pos:
            continue
        c_s = ref_graph(a_s[b], ids_s[b], pos)
        c_t = ref_graph(teacher_values[b].to(z.dtype), teacher_ids[b], pos)
        total = total + ref_w1(c_s.sum(1) / len(c_s), c_t.sum(1) / len(c_t))
        count += 1
    return total, count


def ref_token_logprobs(z, labels):
    return torch.log_softmax(z, -1).gather(-1, labels[..., None])[..., 0]


# ============================================================ cases shared with the TP tests
def make_case(name, *, dtype, vocab_size, padded, k, b=2, s=5, ties=False, all_masked=False,
              temperature=1.0, seed=0, teacher_vocab=40):
    """Full padded logits [b, s, padded] (padding columns hold huge values that must never win),
    teacher top-K, mask (one sequence partly masked), labels, loss weights."""
    g = torch.Generator().manual_seed(seed)
    if ties:   # small integers: many exact ties, also across shard boundaries
        z = torch.randint(-2, 3, (b, s, vocab_size), generator=g).to(F64)
    else:
        z = torch.randn(b, s, vocab_size, generator=g, dtype=F64) * 2
    full = torch.full((b, s, padded), 50.0, dtype=F64)
    full[..., :vocab_size] = z
    full = full.to(dtype)
    t_vals = torch.sort(torch.randn(b, s, k, generator=g, dtype=F64) * 1.5 + 1, -1,
                        descending=True).values
    t_ids = torch.stack([torch.randperm(teacher_vocab, generator=g)[:k] for _ in range(b * s)])
    mask = torch.ones(b, s)
    mask[0, 1] = 0
    mask[-1, 2:] = 0
    if all_masked:
        mask.zero_()
    return dict(name=name, full=full, vocab_size=vocab_size, k=k, temperature=temperature,
                t_vals=t_vals, t_ids=t_ids.view(b, s, k), mask=mask,
                labels=torch.randint(0, vocab_size, (b, s), generator=g),
                w=torch.randn(b, s, k, generator=g, dtype=F64),
                wl=torch.randn(b, s, generator=g, dtype=F64),
                w_raw=torch.randn(b, s, k, generator=g, dtype=F64))


def reference(case):
    """Forward values and gradients (w.r.t. the true-vocab logits) of every function."""
    k, V, T = case["k"], case["vocab_size"], case["temperature"]
    out = {}

    def run(name, fn):
        z = case["full"][..., :V].to(F64).requires_grad_()   # the reference sees the cast input
        res = fn(z)
        loss = res[0] if isinstance(res, tuple) else res
        loss.backward()
        out[name] = (res, z.grad)

    w, wl, mask = case["w"], case["wl"], case["mask"]
    run("topk", lambda z: ((ref_topk(z, k)[0] * w).sum(), ref_topk(z, k)))
    run("std_topk", lambda z: ((ref_standardized_topk(z, k)[0] * w).sum(),
                               ref_standardized_topk(z, k)))
    run("uld", lambda z: ref_uld(z, case["t_vals"], mask, k, T))
    run("uld_topk", lambda z: ref_uld(z, case["t_vals"], mask, k, T, zscore="topk"))
    run("gld", lambda z: ref_gld(z, case["t_vals"], case["t_ids"], mask, k))
    run("logp", lambda z: ((ref_token_logprobs(z, case["labels"]) * wl).sum(),
                           ref_token_logprobs(z, case["labels"])))

    def ce_topk(z):     # every output of the fused Function, each with its own weights
        ce = -ref_token_logprobs(z, case["labels"])
        a, ids = ref_standardized_topk(z, k)
        raw = ref_topk(z, k)[0]
        return (ce * wl).sum() + (a * w).sum() + (raw * case["w_raw"]).sum(), (ce, a, raw, ids)
    run("ce_topk", ce_topk)

    def fusion(z):      # the fusion stage's loss: masked CE + ULD (both z-scores) + 0.5 GLD
        ce_sum = -(ref_token_logprobs(z, case["labels"]) * mask).sum()
        uld, n = ref_uld(z, case["t_vals"], mask, k, T)
        uld_topk, _ = ref_uld(z, case["t_vals"], mask, k, T, zscore="topk")
        gld, _ = ref_gld(z, case["t_vals"], case["t_ids"], mask, k)
        return ce_sum + uld + uld_topk + 0.5 * gld, n
    run("fusion", fusion)
    return out


def ours(logits, case, tp_group=None, chunk_tokens=None):
    """Run every function on one shard; return {name: (outputs, grad of the shard)}."""
    k, V, T = case["k"], case["vocab_size"], case["temperature"]
    w, wl, mask = case["w"], case["wl"], case["mask"]
    kw = dict(vocab_size=V, tp_group=tp_group, chunk_tokens=chunk_tokens)
    res = {}

    def run(name, fn):
        x = logits.detach().clone().requires_grad_()
        outs = fn(x)
        outs[0].backward()
        res[name] = (tuple(o.detach() if torch.is_tensor(o) else o for o in outs), x.grad)

    def topk_run(fn):
        def f(x):
            v, i = fn(x, k, **kw)
            return (v * w.to(v.dtype)).sum(), v, i
        return f

    run("topk", topk_run(distributed_topk))
    run("std_topk", topk_run(standardized_topk))
    run("uld", lambda x: uld_loss(x, case["t_vals"], mask, k=k, temperature=T, **kw))
    run("uld_topk", lambda x: uld_loss(x, case["t_vals"], mask, k=k, temperature=T,
                                       zscore="topk", **kw))
    run("gld", lambda x: gld_loss(x, case["t_vals"], case["t_ids"], mask, k=k, **kw))

    def logp(x):
        tok = token_logprobs(x, case["labels"], **kw)
        seq_sum, n_tok = sequence_logprobs(x, case["labels"], mask, **kw)
        return (tok * wl.to(tok.dtype)).sum() + 0 * seq_sum.sum(), tok, seq_sum, n_tok
    run("logp", logp)

    def ce_topk(x):
        out = cross_entropy_and_topk(x, case["labels"], k, **kw)
        loss = ((out.ce * wl.to(out.ce.dtype)).sum() + (out.values * w.to(out.ce.dtype)).sum()
                + (out.raw_values * case["w_raw"].to(out.ce.dtype)).sum())
        return (loss, *out)
    run("ce_topk", ce_topk)
    run("fusion", lambda x: fusion_loss(cross_entropy_and_topk(x, case["labels"], k, **kw), case))
    return res


def fusion_loss(out, case):
    """The fusion stage's loss from ``(ce, values, raw_values, ids)`` (fused or separate)."""
    k, T, mask = case["k"], case["temperature"], case["mask"]
    ce, vals, raw, ids = out
    ce_sum = (ce * mask.to(ce.dtype)).sum()
    uld, n = uld_loss(None, case["t_vals"], mask, k=k, temperature=T, student_topk=(vals, ids))
    uld_topk, _ = uld_loss(None, case["t_vals"], mask, k=k, temperature=T, zscore="topk",
                           student_topk=(raw, ids))
    gld, _ = gld_loss(None, case["t_vals"], case["t_ids"], mask, k=k, student_topk=(vals, ids))
    return ce_sum + uld + uld_topk + 0.5 * gld, n


def separate_ce_topk(x, labels, k, **kw):
    """The unfused path: three autograd Functions, three shard-sized gradients summed by autograd."""
    ce = -token_logprobs(x, labels, **kw)
    vals, ids = standardized_topk(x, k, **kw)
    raw, _ = distributed_topk(x, k, **kw)
    return ce, vals, raw, ids


def fused_and_separate(logits, case, tp_group=None, chunk_tokens=None, labels=None):
    """The fusion loss through ``cross_entropy_and_topk`` and through the separate Functions:
    ``{path: (outputs, loss, grad of the shard)}``."""
    kw = dict(vocab_size=case["vocab_size"], tp_group=tp_group, chunk_tokens=chunk_tokens)
    labels = case["labels"] if labels is None else labels
    res = {}
    for path, fn in (("fused", cross_entropy_and_topk), ("separate", separate_ce_topk)):
        x = logits.detach().clone().requires_grad_()
        out = tuple(fn(x, labels, case["k"], **kw))
        loss, _ = fusion_loss(out, case)
        loss.backward()
        res[path] = (tuple(o.detach() for o in out), loss.detach(), x.grad)
    return res


def assert_fused_equals_separate(res, case, exact=True):
    """Forward: ids equal; values, raw values and CE equal (bitwise with ``exact``: same sweeps,
    same collectives order at TP 1). Gradient: the fused one adds CE and top-K terms in fp32 and
    rounds once, the separate path rounds each Function's gradient to the logits dtype first:
    equal up to that rounding."""
    (f_out, f_loss, f_grad), (s_out, s_loss, s_grad) = res["fused"], res["separate"]
    name, dtype = case["name"], case["full"].dtype
    assert torch.equal(f_out[3], s_out[3]), f"{name}: ids differ"
    for what, a, b in zip(("ce", "values", "raw_values"), f_out, s_out):
        assert a.dtype == b.dtype, (name, what)
        if exact:
            assert torch.equal(a, b), f"{name}: {what} differ"
        else:
            tol = 1e-12 if dtype == F64 else 1e-5
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name} {what}: {m}")
    torch.testing.assert_close(f_loss, s_loss, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-6)
    assert f_grad.dtype == s_grad.dtype == dtype and f_grad.shape == s_grad.shape
    assert (f_grad[..., case["vocab_size"]:] == 0).all(), f"{name}: padding got a gradient"
    scale = max(1.0, float(s_grad.abs().max()))
    # bf16: 3 roundings (one per separate gradient + autograd's sum) vs one
    tol = {F64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 3 * 2.0 ** -8}[dtype] * scale
    torch.testing.assert_close(f_grad.to(F64), s_grad.to(F64), atol=tol, rtol=0,
                               msg=lambda m: f"{name} grad: {m}")


TOL = {F64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-4, 2e-2)}


def assert_matches(case, got, grads_full, ref):
    """got: {name: outputs}; grads_full: {name: grad [b, s, padded]} (shards concatenated)."""
    V = case["vocab_size"]
    dtype = case["full"].dtype
    atol_f, rtol_g = TOL[dtype]
    for name, (r_out, r_grad) in ref.items():
        g_out, g_grad = got[name], grads_full[name]
        label = f"{case['name']}/{name}"
        if name in ("topk", "std_topk"):
            torch.testing.assert_close(g_out[1].to(F64), r_out[1][0].detach(), atol=atol_f, rtol=0,
                                       msg=lambda m: f"{label} values: {m}")
            assert torch.equal(g_out[2], r_out[1][1]), f"{label} ids differ"
        elif name == "ce_topk":
            for i, what in enumerate(("ce", "values", "raw_values")):
                torch.testing.assert_close(g_out[1 + i].to(F64), r_out[1][i].detach(), atol=atol_f,
                                           rtol=0, msg=lambda m: f"{label} {what}: {m}")
            assert torch.equal(g_out[4], r_out[1][3]), f"{label} ids differ"
        elif name == "logp":
            torch.testing.assert_close(g_out[1].to(F64), r_out[1].detach(), atol=atol_f, rtol=0)
            keep = case["mask"] > 0
            torch.testing.assert_close(g_out[2].to(F64), torch.where(keep, r_out[1], 0).sum(-1).detach(),
                                       atol=atol_f * 10, rtol=0)
            assert torch.equal(g_out[3], keep.sum(-1))
        else:
            torch.testing.assert_close(g_out[0].to(F64), r_out[0].detach(), atol=atol_f * 10, rtol=0,
                                       msg=lambda m: f"{label} loss: {m}")
            assert int(g_out[1]) == r_out[1], f"{label} count"
            assert not torch.isnan(g_out[0]).any()
        assert g_grad.dtype == dtype, f"{label}: grad dtype {g_grad.dtype}"
        assert (g_grad[..., V:] == 0).all(), f"{label}: padded columns got a gradient"
        if name in ("gld", "fusion") and case["name"].startswith("ties"):
            # tied eccentricities: W1 has no unique gradient (which tied node sorts first is
            # arbitrary, every choice is a valid subgradient); the forward is still compared
            continue
        scale = max(1.0, float(r_grad.abs().max()))
        torch.testing.assert_close(g_grad[..., :V].to(F64), r_grad, atol=rtol_g * scale, rtol=0,
                                   msg=lambda m: f"{label} grad: {m}")


def serial_cases():
    return [
        make_case("f64_padded", dtype=F64, vocab_size=37, padded=40, k=5),
        make_case("ties_f32", dtype=torch.float32, vocab_size=37, padded=48, k=7, ties=True, seed=1),
        make_case("bf16", dtype=torch.bfloat16, vocab_size=37, padded=40, k=5, seed=2),
        make_case("f32_T3", dtype=torch.float32, vocab_size=30, padded=30, k=4, seed=3,
                  temperature=3.0),
        make_case("f32_all_masked", dtype=torch.float32, vocab_size=37, padded=40, k=5, seed=4,
                  all_masked=True),
    ]


# ============================================================ serial path (TP = 1) vs reference
@pytest.mark.parametrize("chunk_tokens", [None, 3])
def test_serial_matches_reference(chunk_tokens):
    for case in serial_cases():
        res = ours(case["full"], case, chunk_tokens=chunk_tokens)
        assert_matches(case, {n: r[0] for n, r in res.items()},
                       {n: r[1] for n, r in res.items()}, reference(case))


def test_all_masked_is_zero_without_nan():
    case = make_case("m", dtype=torch.bfloat16, vocab_size=37, padded=40, k=5, all_masked=True)
    res = ours(case["full"], case)
    for name in ("uld", "uld_topk", "gld"):
        (loss, count), grad = res[name]
        assert float(loss) == 0.0 and int(count) == 0 and not torch.isnan(loss)
        assert (grad == 0).all() and not torch.isnan(grad).any()
    (_, _, seq_sum, n_tok), grad = res["logp"]
    assert (seq_sum == 0).all() and (n_tok == 0).all()


def test_bf16_math_in_fp32():
    case = make_case("bf", dtype=torch.bfloat16, vocab_size=37, padded=40, k=5)
    x = case["full"].clone().requires_grad_()
    v, ids = standardized_topk(x, 5, vocab_size=37)
    assert v.dtype == torch.float32 and ids.dtype == torch.int64
    loss, count = uld_loss(x, case["t_vals"].to(torch.bfloat16), case["mask"], k=5, vocab_size=37)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16


def test_topk_ties_and_signed_zero():
    # -0.0 and +0.0 are equal: the lower id wins, like any other tie
    z = torch.tensor([[[0.0, -0.0, 1.0, -0.0, 0.0, 1.0]]])
    v, ids = distributed_topk(z, 4)
    assert ids.tolist() == [[[2, 5, 0, 1]]]
    assert v.tolist() == [[[1.0, 1.0, 0.0, 0.0]]]
    # negative values, infinities and k == vocab_size
    z = torch.tensor([[[-1.0, -2.0, -torch.inf, 3.0, -1.0, torch.inf]]])
    v, ids = distributed_topk(z, 6)
    assert ids.tolist() == [[[5, 3, 0, 4, 1, 2]]]
    with pytest.raises(ValueError):
        distributed_topk(z, 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_topk_boundary_ties_pick_lowest_ids(dtype):
    """Coarse logits (as bf16 makes them): the k-th value ties with many left-out columns."""
    g = torch.Generator().manual_seed(12)
    z = (torch.randint(0, 6, (4, 8, 300), generator=g) * 0.5).to(dtype)
    want_v, want_i = ref_topk(z.to(F64), 10)
    for chunk_tokens in (None, 3):
        v, ids = distributed_topk(z, 10, chunk_tokens=chunk_tokens)
        assert torch.equal(ids, want_i) and torch.equal(v.to(F64), want_v)
        v, ids = standardized_topk(z, 10, chunk_tokens=chunk_tokens)
        assert torch.equal(ids, want_i)


# ============================================================ fused CE + top-K == separate path
@pytest.mark.parametrize("chunk_tokens", [None, 3])
def test_fused_ce_topk_equals_separate_path(chunk_tokens):
    """cross_entropy_and_topk gives the separate Functions' outputs bit for bit at TP 1, and the
    fusion loss's gradient up to the separate path's extra roundings."""
    cases = serial_cases() + [make_case("ties_bf16", dtype=torch.bfloat16, vocab_size=37, padded=40,
                                        k=7, ties=True, seed=8)]
    for case in cases:
        assert_fused_equals_separate(fused_and_separate(case["full"], case, chunk_tokens=chunk_tokens),
                                     case)


def test_fused_ce_topk_ignored_labels_and_partial_use():
    """Labels -100 (masked positions) give no CE gradient; when only some outputs reach the loss
    the gradient is that of the matching separate Function."""
    case = make_case("ign", dtype=torch.float32, vocab_size=37, padded=40, k=5, seed=9)
    labels = torch.where(case["mask"] > 0, case["labels"], -100)
    assert_fused_equals_separate(fused_and_separate(case["full"], case, labels=labels), case)
    kw = dict(vocab_size=37)
    for i, (sep, w) in enumerate(((lambda x: -token_logprobs(x, labels, **kw), case["wl"]),
                                  (lambda x: standardized_topk(x, 5, **kw)[0], case["w"]),
                                  (lambda x: distributed_topk(x, 5, **kw)[0], case["w_raw"]))):
        x1 = case["full"].clone().requires_grad_()
        (cross_entropy_and_topk(x1, labels, 5, **kw)[i] * w.float()).sum().backward()
        x2 = case["full"].clone().requires_grad_()
        (sep(x2) * w.float()).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=0)
    x = case["full"].clone().requires_grad_()
    ce = cross_entropy_and_topk(x, labels, 5, **kw).ce
    (ce * case["mask"]).sum().backward()
    assert (x.grad[case["mask"] == 0] == 0).all()


def test_fused_ce_topk_errors():
    z = torch.randn(2, 3, 20)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_and_topk(z, torch.zeros(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="k=21"):
        cross_entropy_and_topk(z, torch.zeros(2, 3, dtype=torch.long), 21)


# ============================================================ gradcheck (float64, tiny)
def test_gradcheck_all_functions():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 3, 11, generator=g, dtype=F64).requires_grad_()
    t_vals = torch.randn(2, 3, 4, generator=g, dtype=F64)
    t_ids = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(6)]).view(2, 3, 4)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    labels = torch.randint(0, 9, (2, 3), generator=g)
    kw = dict(vocab_size=9)   # two padded columns
    gc = torch.autograd.gradcheck
    assert gc(lambda x: distributed_topk(x, 4, **kw)[0], (z,))
    assert gc(lambda x: standardized_topk(x, 4, **kw)[0], (z,))
    assert gc(lambda x: standardized_topk(x, 11, vocab_size=11, chunk_tokens=2)[0], (z,))
    assert gc(lambda x: uld_loss(x, t_vals, mask, k=4, **kw)[0], (z,))
    assert gc(lambda x: uld_loss(x, t_vals, mask, k=4, zscore="topk", temperature=2.0, **kw)[0], (z,))
    assert gc(lambda x: gld_loss(x, t_vals, t_ids, mask, k=4, **kw)[0], (z,))
    assert gc(lambda x: token_logprobs(x, labels, **kw), (z,))
    assert gc(lambda x: sequence_logprobs(x, labels, mask, **kw)[0], (z,))
    assert gc(lambda x: cross_entropy_and_topk(x, labels, 4, **kw)[:3], (z,))
    assert gc(lambda x: cross_entropy_and_topk(x, labels, 11, vocab_size=11, chunk_tokens=2)[:3], (z,))


# ============================================================ closed forms
def test_identical_topk_gives_zero_uld_and_gld():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 6, 50, generator=g)
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    a, ids = standardized_topk(z, 10)
    assert float(uld_loss(z, a, mask)[0]) == pytest.approx(0.0, abs=1e-6)
    raw, _ = distributed_topk(z, 10)      # zscore="topk" standardises the raw top-K on both sides
    assert float(uld_loss(z, raw, mask, zscore="topk")[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(gld_loss(z, a, ids, mask)[0]) == pytest.approx(0.0, abs=1e-6)
    # GLD compares graphs, not vocabularies: relabelling the teacher's ids changes nothing
    relabel = torch.randperm(50, generator=g) + 1000
    assert float(gld_loss(z, a, relabel[ids], mask)[0]) == pytest.approx(0.0, abs=1e-6)


def test_uld_temperature_limit_and_bounds():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 30, generator=g, dtype=F64)
    t = torch.sort(torch.randn(2, 4, 10, generator=g, dtype=F64) * 3, -1, descending=True).values
    mask = torch.ones(2, 4)
    losses = [float(uld_loss(z, t, mask, temperature=T)[0]) for T in (1.0, 10.0, 1e3, 1e6)]
    assert losses[0] > losses[1] > losses[2] > losses[3] >= 0
    assert losses[3] < 1e-4                    # both softmaxes -> uniform over K
    assert losses[2] / losses[3] == pytest.approx(1e3, rel=1e-2)    # and the gap shrinks as 1/T
    assert 0 < losses[0] <= 2 * 8              # each position's L1 of two distributions <= 2


def test_uld_is_symmetric():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 4, 10, generator=g, dtype=F64)
    b = torch.randn(3, 4, 10, generator=g, dtype=F64)
    for zscore in ("full", "topk"):
        torch.testing.assert_close(uld_from_topk(a, b, zscore=zscore),
                                   uld_from_topk(b, a, zscore=zscore))
    # through the full loss: student z1 vs teacher(z2) == student z2 vs teacher(z1)
    z1, z2 = torch.randn(2, 2, 3, 40, generator=g, dtype=F64)
    m = torch.ones(2, 3)
    l12 = uld_loss(z1, standardized_topk(z2, 10)[0], m)[0]
    l21 = uld_loss(z2, standardized_topk(z1, 10)[0], m)[0]
    torch.testing.assert_close(l12, l21)


def test_wasserstein_1d_exact_against_pot():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(6)
    for n, m in [(1, 1), (3, 3), (4, 6), (7, 3), (5, 11), (10, 10)]:
        x = torch.randn(n, generator=g, dtype=F64)
        y = torch.randn(m, generator=g, dtype=F64) + 0.3
        want = ot.emd2(torch.full((n,), 1.0 / n, dtype=F64), torch.full((m,), 1.0 / m, dtype=F64),
                       (x[:, None] - y[None, :]).abs())
        assert float(wasserstein_1d(x, y)) == pytest.approx(float(want), abs=1e-12)
        assert float(ref_w1(x, y)) == pytest.approx(float(want), abs=1e-12)


def test_eccentricity_is_graph_degree():
    g = torch.Generator().manual_seed(8)
    vals = torch.randn(1, 5, 4, generator=g, dtype=F64)
    ids = torch.stack([torch.randperm(7, generator=g)[:4] for _ in range(5)]).view(1, 5, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    ecc, n_nodes = eccentricity(vals, ids, mask)
    c = ref_graph(vals[0], ids[0], [0, 1, 3, 4])
    assert int(n_nodes[0]) == c.shape[0]
    torch.testing.assert_close(ecc, c.sum(1) / c.shape[0])


def test_gld_never_exceeds_gw1_cost_of_exact_solver_plan():
    """Mémoli's first lower bound: W1(ecc_s, ecc_t) <= GW_1 cost of any coupling (docs/methods.md §3)."""
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(9)
    checked = 0
    for trial in range(12):
        s, k = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        va, vb = (torch.randn(1, s, k, generator=g, dtype=F64) * 1.5 for _ in range(2))
        ia = torch.stack([torch.randperm(k + 3, generator=g)[:k] for _ in range(s)]).view(1, s, k)
        ib = torch.stack([torch.randperm(k + 5, generator=g)[:k] for _ in range(s)]).view(1, s, k)
        mask = torch.ones(1, s)
        gld = float(gld_from_topk(va, ia, vb, ib, mask)[0])
        c_s, c_t = ref_graph(va[0], ia[0], range(s)), ref_graph(vb[0], ib[0], range(s))
        p = torch.full((c_s.shape[0],), 1.0 / c_s.shape[0], dtype=F64)
        q = torch.full((c_t.shape[0],), 1.0 / c_t.shape[0], dtype=F64)
        plan = ot.gromov.gromov_wasserstein(c_s, c_t, p, q, loss_fun="square_loss")
        diff = (c_s[:, None, :, None] - c_t[None, :, None, :]).abs()          # [i, j, k, l]
        for coupling in (plan, p[:, None] * q[None, :]):
            torch.testing.assert_close(coupling.sum(1), p)                   # a coupling indeed
            gw1 = float(torch.einsum("ijkl,ij,kl->", diff, coupling, coupling))
            assert gld <= gw1 + 1e-9, (trial, gld, gw1)
        checked += 1
        assert gld >= 0
    assert checked == 12


# ============================================================ errors
def test_clear_errors():
    z = torch.randn(2, 3, 20)
    t = torch.randn(2, 3, 10)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="K=10 but k=5"):
        uld_loss(z, t, m, k=5)
    with pytest.raises(ValueError, match="K=10 but k=4"):
        gld_loss(z, t, torch.zeros(2, 3, 10, dtype=torch.long), m, k=4)
    with pytest.raises(ValueError, match="zscore"):
        uld_loss(z, t, m, zscore="none")
    with pytest.raises(ValueError, match="mask"):
        uld_loss(z, t, torch.ones(2, 4))
    with pytest.raises(ValueError, match="student logits"):
        uld_loss(torch.randn(2, 4, 20), torch.randn(2, 3, 10), m)
    with pytest.raises(ValueError, match="ids"):
        gld_loss(z, t, torch.zeros(2, 3, 9, dtype=torch.long), m)
    with pytest.raises(ValueError, match="vocab_size"):
        distributed_topk(z, 3, vocab_size=21)
    with pytest.raises(ValueError, match="reduction"):
        uld_loss(z, t, m, reduction="mean")


def test_shared_topk_and_sequence_reduction():
    """ULD and GLD can share one standardised top-K; per-sequence sums add up to the total."""
    case = make_case("s", dtype=torch.float32, vocab_size=37, padded=40, k=5)
    x = case["full"].clone().requires_grad_()
    topk = standardized_topk(x, 5, vocab_size=37)
    u, uc = uld_loss(None, case["t_vals"], case["mask"], k=5, student_topk=topk, reduction="sequence")
    g, gc = gld_loss(None, case["t_vals"], case["t_ids"], case["mask"], k=5, student_topk=topk,
                     reduction="sequence")
    (u.sum() + g.sum()).backward()
    x2 = case["full"].clone().requires_grad_()
    u2, uc2 = uld_loss(x2, case["t_vals"], case["mask"], k=5, vocab_size=37)
    g2, gc2 = gld_loss(x2, case["t_vals"], case["t_ids"], case["mask"], k=5, vocab_size=37)
    (u2 + g2).backward()
    torch.testing.assert_close(u.sum(), u2)
    torch.testing.assert_close(g.sum(), g2)
    assert int(uc.sum()) == int(uc2) and int(gc.sum()) == int(gc2)
    torch.testing.assert_close(x.grad, x2.grad)


def test_strided_sbv_logits():
    """Megatron's output layer gives [s, b, v]; a transposed (strided) view works as [b, s, v]."""
    case = make_case("t", dtype=torch.float32, vocab_size=37, padded=40, k=5)
    sbv = case["full"].transpose(0, 1).contiguous()
    strided = sbv.transpose(0, 1)                       # [b, s, v], not contiguous
    assert not strided.is_contiguous()
    res_strided = ours(strided, case)
    res_plain = ours(case["full"], case)
    for name in res_plain:
        for a, b in zip(res_strided[name][0], res_plain[name][0]):
            assert torch.equal(a, b), name
        torch.testing.assert_close(res_strided[name][1], res_plain[name][1])


def test_bf16_forward_never_makes_a_shard_sized_fp32_copy():
    """Chunking: every allocation is at most one fp32 chunk, in forward; in backward the only
    shard-sized allocation is the bf16 gradient itself (measured with the profiler's allocator
    hooks, per op)."""
    b, s, v, chunk = 2, 64, 4096, 8
    x = torch.randn(b, s, v).to(torch.bfloat16).requires_grad_()
    t_vals = torch.randn(b, s, 10)
    t_ids = torch.stack([torch.randperm(50)[:10] for _ in range(b * s)]).view(b, s, 10)
    mask = torch.ones(b, s)
    labels = torch.randint(0, v, (b, s))
    chunk_fp32 = chunk * v * 4
    with torch.profiler.profile(profile_memory=True) as fwd:
        topk = standardized_topk(x, 10, chunk_tokens=chunk)
        u, _ = uld_loss(None, t_vals, mask, student_topk=topk)
        g, _ = gld_loss(None, t_vals, t_ids, mask, student_topk=topk)
        lp = token_logprobs(x, labels, chunk_tokens=chunk)
    biggest = max(e.self_cpu_memory_usage for e in fwd.events())
    assert 0 < biggest <= chunk_fp32 < x.numel() * 4 // 8, biggest
    with torch.profiler.profile(profile_memory=True) as bwd:
        (u + g + lp.sum()).backward()
    sizes = sorted((e.self_cpu_memory_usage for e in bwd.events()), reverse=True)
    grad_bytes = x.numel() * 2
    assert sizes[0] <= grad_bytes, sizes[:3]
    # besides the gradients (one per autograd Function, summed by autograd), only chunk-sized
    assert all(sz <= max(chunk_fp32, 64 * 1024) for sz in sizes if sz != grad_bytes), sizes[:6]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_ce_topk_backward_makes_one_shard_sized_gradient(dtype):
    """CE + ULD + GLD through cross_entropy_and_topk: forward allocates at most one fp32 chunk at a
    time, backward exactly ONE shard-sized tensor (the gradient, in the logits dtype) and otherwise
    chunk-sized temporaries; the separate Functions allocate one shard-sized gradient each."""
    b, s, v, chunk = 2, 64, 4096, 8
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(b, s, v, generator=g).to(dtype)
    t_vals = torch.randn(b, s, 10, generator=g)
    t_ids = torch.stack([torch.randperm(50, generator=g)[:10] for _ in range(b * s)]).view(b, s, 10)
    mask = torch.ones(b, s)
    labels = torch.randint(0, v, (b, s), generator=g)
    chunk_fp32, grad_bytes = chunk * v * 4, logits.numel() * logits.element_size()
    small = max(chunk_fp32, 64 * 1024)

    def profile(fn):
        x = logits.clone().requires_grad_()
        with torch.profiler.profile(profile_memory=True) as fwd:
            ce, vals, _, ids = fn(x, labels, 10, chunk_tokens=chunk)
            u, _ = uld_loss(None, t_vals, mask, student_topk=(vals, ids))
            gl, _ = gld_loss(None, t_vals, t_ids, mask, student_topk=(vals, ids))
            loss = (ce * mask).sum() + u + 0.5 * gl
        with torch.profiler.profile(profile_memory=True) as bwd:
            loss.backward()
        assert x.grad.dtype == dtype
        return ([e.self_cpu_memory_usage for e in fwd.events()],
                sorted((e.self_cpu_memory_usage for e in bwd.events()), reverse=True))

    fwd, bwd = profile(cross_entropy_and_topk)
    assert 0 < max(fwd) <= chunk_fp32 < logits.numel() * 4 // 8, max(fwd)
    assert bwd[0] == grad_bytes and bwd[1] <= small, bwd[:4]     # one gradient, rest chunk-sized
    _, bwd_sep = profile(separate_ce_topk)
    assert sum(sz >= grad_bytes for sz in bwd_sep) == 2, bwd_sep[:4]   # CE and top-K: one each
