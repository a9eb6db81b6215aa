"""The fuse stage with ``fuse.loss: hybrid`` against an independent float64 reference.

The stage runs as the loop drives it (``prepare_step``, then ``loss_func`` + backward per
micro-batch, reports reduced by ``train._reduce_reports``) on float64 student logits, at TP1 and
TP2 (gloo; true vocab 37 in 48 padded columns: the second shard holds 13 real columns). The
teachers are synthetic: full-vocabulary teacher logits per sample, from which ``fetch`` hands the
stage what a shard holds (z-scored top-K values, teacher ids, aligned mask, CE per byte, top-K
log-probs in fp32), and explicit one-to-one match maps teacher id -> pivot id.

The reference never calls the stage's losses: per position the hybrid of docs/methods.md §9 from
the FULL teacher and student logits (``ref_hybrid`` of tests/losses/test_hybrid_loss.py: teacher
log_softmax -> top-K, the dense map, the student's full log_softmax, the unmatched student
remainder by a full sort), GLD from tests/helpers/fuse_reference.py, CE from log_softmax; teacher
weights per sample (uniform: the static weights; avgCE: softmax(-CE)); every term over its global
count (methods.md §4). Its gradient is plain autograd. Cases: random logits with tail bucket,
adaptive weights and GLD; integer logits (ties) with avgCE and fixed weights; and the identity
case (teacher = the student itself, identity map): the hybrid term and GLD vanish and the total
is the CE.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_fusion.local_ranks import run_on_ranks

pytestmark = [pytest.mark.dist]

F64 = torch.float64
SEQ, VOCAB, PADDED, K, B = 6, 37, 48, 4, 2
SAMPLES = [11, 12, 13, 14]                     # two micro-batches of two


def student_logits(sid: int, ties: bool) -> torch.Tensor:
    """[SEQ, PADDED] float64; padding columns large (they must never count)."""
    g = torch.Generator().manual_seed(500 + sid)
    z = torch.randint(-3, 4, (SEQ, PADDED), generator=g).to(F64) if ties else \
        torch.randn(SEQ, PADDED, generator=g, dtype=F64) * 2
    z[:, VOCAB:] = 40.0
    return z


def batch(sids: list[int]) -> dict:
    g = torch.Generator().manual_seed(sids[0])
    tokens = torch.randint(0, VOCAB, (len(sids), SEQ), generator=g)
    loss_mask = torch.ones(len(sids), SEQ)
    loss_mask[:, :2] = 0                       # the prompt
    loss_mask[1, -1] = 0
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": loss_mask,
            "position_ids": torch.arange(SEQ).expand(len(sids), SEQ),
            "sample_id": torch.tensor(sids)}


class Teacher:
    """Full-vocab teacher logits per sample id; ``fetch`` gives the shard's view of them."""

    def __init__(self, name: str, vt: int, seed: int, *, self_of: bool = False, ties=False):
        self.name, self.vt, self.seed, self.self_of, self.ties = name, vt, seed, self_of, ties

    def logits(self, sid: int) -> torch.Tensor:
        if self.self_of:                       # the teacher is the student (identity case)
            return student_logits(sid, self.ties)[:, :VOCAB]
        g = torch.Generator().manual_seed(self.seed * 1000 + sid)
        return torch.randn(SEQ, self.vt, generator=g, dtype=F64) * 2

    def aligned(self, sid: int) -> torch.Tensor:
        if self.self_of:
            return torch.ones(SEQ, dtype=torch.bool)
        g = torch.Generator().manual_seed(self.seed * 77 + sid)
        return torch.rand(SEQ, generator=g) > 0.25

    def ce(self, sid: int) -> float:
        return float(torch.rand((), generator=torch.Generator().manual_seed(self.seed + sid)) * 3)

    def fetch(self, sample_ids: torch.Tensor, seq_len: int):
        vals, ids, aligned, ce, logp = [], [], [], [], []
        for sid in sample_ids.tolist():
            z = self.logits(sid)
            lp = torch.log_softmax(z, -1)
            top, idx = torch.sort(lp, dim=-1, descending=True, stable=True)
            idx = idx[:, :K]
            mu = z.mean(-1, keepdim=True)
            sd = ((z - mu) ** 2).mean(-1, keepdim=True).sqrt()
            vals.append(((z.gather(-1, idx) - mu) / (sd + 1e-6)).float())
            ids.append(idx)
            logp.append(top[:, :K].float())
            aligned.append(self.aligned(sid))
            ce.append(self.ce(sid))
        return (torch.stack(vals), torch.stack(ids), torch.stack(aligned),
                torch.tensor(ce, dtype=torch.float32), torch.stack(logp))


def match_map(vt: int, seed: int, frac: float, identity: bool = False):
    from megatron_fusion.teachers.vocab_match import VocabMatch

    if identity:
        t_ids = p_ids = torch.arange(VOCAB)
    else:
        g = torch.Generator().manual_seed(seed)
        t_ids = torch.randperm(vt, generator=g)[:int(frac * min(vt, VOCAB))].sort().values
        p_ids = torch.randperm(VOCAB, generator=g)[:t_ids.numel()]
    return VocabMatch(t_ids, p_ids, vt if not identity else VOCAB, VOCAB, "t", "p")


CASES = {
    # name: (teachers, maps, fuse overrides, student ties)
    "tail_adaptive_gld": (lambda: [Teacher("tA", 45, 1), Teacher("tB", 60, 2)],
                          lambda: [match_map(45, 1, 0.6), match_map(60, 2, 0.8)],
                          dict(tail_bucket=True, lambda_matched="adaptive",
                               lambda_unmatched="adaptive", lambda_gld=0.5), False),
    "ties_avgce": (lambda: [Teacher("tA", 45, 3), Teacher("tB", 60, 4)],
                   lambda: [match_map(45, 3, 0.5), match_map(60, 4, 0.9)],
                   dict(weighting="avgCE", lambda_matched=0.6, lambda_unmatched=1.3,
                        lambda_gld=0.0, lambda_ce=0.7), True),
    # fuse.loss=uld (the paper's ULD) through the same harness, for the gradient diagnostics
    "uld_gld": (lambda: [Teacher("tA", 45, 5), Teacher("tB", 60, 6)],
                lambda: [match_map(45, 5, 0.6), match_map(60, 6, 0.8)],
                dict(loss="uld", lambda_uld=0.8, lambda_gld=0.5), False),
    "identity": (lambda: [Teacher("self", VOCAB, 0, self_of=True)],
                 lambda: [match_map(VOCAB, 0, 1.0, identity=True)],
                 # GLD = 0 here sits on the kink of |.| in W1 (fp32 teacher values): its
                 # gradient is a sign of rounding noise, so the identity case leaves GLD out
                 dict(tail_bucket=True, lambda_gld=0.0), False),
}


def _config(name: str):
    from megatron_fusion.config import (Config, FuseConfig, ModelConfig, RunConfig,
                                        TeacherConfig, TrainConfig)

    teachers, _, over, _ = CASES[name]
    tcfg = [TeacherConfig(name=t.name, tokenizer="(synthetic)", weight=1.0 + j)
            for j, t in enumerate(teachers())]
    return Config(stage="fuse", run=RunConfig(dir="unused"),
                  model=ModelConfig(seq_length=SEQ, vocab_size=VOCAB),
                  train=TrainConfig(global_batch=4, micro_batch=2),
                  fuse=FuseConfig(teachers=tcfg, k=K, grad_diagnostics=1,
                                  **({"loss": "hybrid"} | over)))


def _run_cases(groups, rank: int, tp: int) -> dict:
    """Each case through the stage at TP = tp: the total objective Σ loss_sum / Σ count, the
    reduced reports and the gradient of the objective (this rank's columns)."""
    from megatron_fusion.stages.fuse import FuseStage
    from megatron_fusion.train import _reduce_reports

    v_local = PADDED // tp
    cols = slice(rank * v_local, (rank + 1) * v_local)
    out = {}
    for name, (teachers, maps, _, ties) in CASES.items():
        cfg = _config(name)
        stage = FuseStage(cfg, VOCAB, groups, teachers=teachers(), matches=maps())
        micro = [batch(SAMPLES[:2]), batch(SAMPLES[2:])]
        stage.prepare_step(micro, groups)
        loss, count, reports, grads = 0.0, 0, [], []
        for mb in micro:
            full = torch.stack([student_logits(s, ties) for s in mb["sample_id"].tolist()])
            x = full[..., cols].clone().requires_grad_()
            ls, n, rep = stage.loss_func(mb, x)
            ls.backward()
            loss, count = loss + float(ls.detach()), count + int(n)
            reports.append(rep)
            grads.append(x.grad)
        # a world all-reduce: at TP1 both ranks add the same sums and counts (same ratios)
        red, _ = _reduce_reports(reports, stage.report_keys, groups, False)
        red = stage.derive_metrics(red)
        out[name] = {"objective": loss / count, "red": red,
                     "grads": [g / count for g in grads]}
    return out


def _ranks(rank, world):
    """TP2 over both ranks, then TP1 on each rank alone (one launch for both layouts)."""
    import torch.distributed as dist

    from megatron_fusion.parallel import StudentGroups, destroy_student_groups, init_student_groups

    tp2 = _run_cases(init_student_groups(tp=world), rank, world)
    destroy_student_groups()
    own = [dist.new_group([r]) for r in range(world)][rank]
    g1 = StudentGroups(tp=own, pp=own, dp=own, tp_size=1, pp_size=1, dp_size=1, tp_rank=0,
                       pp_rank=0, dp_rank=0, device=torch.device("cpu"))
    return {2: tp2, 1: _run_cases(g1, 0, 1)}


# --- the float64 reference --------------------------------------------------------------------

def eccentricity(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """methods.md §3 (as tests/helpers/fuse_reference.py, differentiable): the dense graph
    C = A^T A / |R| over the distinct ids, ecc = row sums / n_nodes."""
    nodes = sorted(set(ids.flatten().tolist()))
    col = torch.tensor([[nodes.index(int(u)) for u in row] for row in ids])
    a = torch.zeros(values.shape[0], len(nodes), dtype=F64).scatter_add(1, col, values.double())
    return (a.T @ a / values.shape[0]).sum(1) / len(nodes)


def wasserstein1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1-D W1 of two uniform empirical distributions: the integral of |F_x^-1 - F_y^-1| over
    the merged breakpoints (as fuse_reference.wasserstein1, differentiable)."""
    from fractions import Fraction

    xs, ys = x.sort().values, y.sort().values
    n, m = len(xs), len(ys)
    cuts = sorted({Fraction(i, n) for i in range(n + 1)} | {Fraction(j, m) for j in range(m + 1)})
    total = xs.sum() * 0
    for lo, hi in zip(cuts, cuts[1:]):
        mid = (lo + hi) / 2
        total = total + float(hi - lo) * (xs[int(mid * n)] - ys[int(mid * m)]).abs()
    return total


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
    from tests.helpers import fuse_reference as fr
    from tests.losses.test_hybrid_loss import ref_hybrid

    teachers, maps, over, ties = CASES[name]
    teachers, maps, cfg = teachers(), maps(), _config(name).fuse
    micro = [batch(SAMPLES[:2]), batch(SAMPLES[2:])]
    zs = [torch.stack([student_logits(s, ties) for s in mb["sample_id"].tolist()])
          [..., :VOCAB].clone().requires_grad_() for mb in micro]
    static = torch.tensor([1.0 + j for j in range(len(teachers))], dtype=F64)
    n_ce = sum(float(mb["loss_mask"].sum()) for mb in micro)
    masks = [[(t.fetch(mb["sample_id"], SEQ)[2] & (mb["loss_mask"] > 0)) for mb in micro]
             for t in teachers]
    n_uld = [sum(float(m.sum()) for m in ms) for ms in masks]
    n_gld = [sum(float(m.any(-1).sum()) for m in ms) for ms in masks]
    ce = matched = unmatched = tail = hyb = uld = gld = 0.0
    for i, (mb, z) in enumerate(zip(micro, zs)):
        lsm = torch.log_softmax(z, -1)
        ce = ce - (lsm.gather(-1, mb["labels"][..., None])[..., 0] * mb["loss_mask"]).sum()
        a_s, id_s = fr.standardised_topk(z, K)
        for bi, sid in enumerate(mb["sample_id"].tolist()):
            if cfg.weighting == "uniform":
                w = static / static.sum()
            else:                                # avgCE: softmax(-CE) over the teachers
                w = torch.softmax(-torch.tensor([t.ce(sid) for t in teachers], dtype=F64), 0)
            for j, (t, m) in enumerate(zip(teachers, maps)):
                mask = masks[j][i][bi:bi + 1]
                tl = t.logits(sid)[None]
                if cfg.lambda_matched == "adaptive":
                    w_m = m.n_matched / m.teacher_vocab_size
                    w_u = 1 - w_m
                else:
                    w_m, w_u = cfg.lambda_matched, cfg.lambda_unmatched
                pos = [s for s in range(SEQ) if mask[0, s]]
                if cfg.loss == "uld":         # methods.md §2: L1 of the sorted softmaxes
                    vals = t.fetch(torch.tensor([sid]), SEQ)[0][0].double()
                    for s in pos:
                        p_s = torch.softmax(a_s[bi, s], -1).sort(descending=True).values
                        p_t = torch.softmax(vals[s], -1).sort(descending=True).values
                        uld = uld + w[j] * (p_s - p_t).abs().sum() / n_uld[j]
                else:
                    args = (z[bi:bi + 1], tl, m.dense(), mask, K)
                    kl = ref_hybrid(*args, 1.0, 0.0, False)
                    kl_tail = ref_hybrid(*args, 1.0, 0.0, True) if cfg.tail_bucket else kl
                    u = ref_hybrid(*args, 0.0, 1.0, False)
                    matched = matched + w[j] * kl / n_uld[j]
                    tail = tail + w[j] * (kl_tail - kl) / n_uld[j]
                    unmatched = unmatched + w[j] * u / n_uld[j]
                    hyb = hyb + w[j] * (w_m * kl_tail + w_u * u) / n_uld[j]
                if pos and not ties:        # GLD's node ids under ties: not compared

                    vals, ids = t.fetch(torch.tensor([sid]), SEQ)[:2]
                    e_s = eccentricity(a_s[bi, pos], id_s[bi, pos])
                    e_t = eccentricity(vals[0, pos].double(), ids[0, pos])
                    gld = gld + w[j] * wasserstein1(e_s, e_t) / n_gld[j]
    ce = ce / n_ce
    dist_term = cfg.lambda_uld * uld if cfg.loss == "uld" else hyb
    terms = {"ce": cfg.lambda_ce * ce, cfg.loss: dist_term, "gld": cfg.lambda_gld * gld}
    # fuse.grad_diagnostics: each term's gradient at the logits over the whole step
    term_grads = {n: torch.autograd.grad(v, zs, retain_graph=True, allow_unused=True)
                  if torch.is_tensor(v) and v.requires_grad else [None] * len(zs)
                  for n, v in terms.items()}
    sq = {n: sum(0.0 if g is None else float((g * g).sum()) for g in gs)
          for n, gs in term_grads.items()}
    dot = {n: sum(0.0 if g is None or c is None else float((g * c).sum())
                  for g, c in zip(gs, term_grads["ce"])) for n, gs in term_grads.items()}
    diag = {f"grad/{n}": v ** 0.5 for n, v in sq.items()}
    for n in (cfg.loss, "gld"):
        both = (sq[n] * sq["ce"]) ** 0.5
        diag[f"grad/{n}_over_ce"] = (sq[n] / sq["ce"]) ** 0.5
        diag[f"grad/cos_{n}_ce"] = dot[n] / both if both > 0 else 0.0
    total = cfg.lambda_ce * ce + dist_term + cfg.lambda_gld * gld
    total.backward()
    grads = []
    for z in zs:
        g = torch.zeros(*z.shape[:-1], PADDED, dtype=F64)
        g[..., :VOCAB] = z.grad
        grads.append(g)
    parts = {"loss/ce": ce, "loss/hybrid": hyb, "loss/matched": matched,
             "loss/unmatched": unmatched, "loss/tail": tail, "loss/gld": gld, "loss/total": total,
             "loss/uld": uld}
    return {k: float(torch.as_tensor(v).detach()) for k, v in parts.items()} | diag | \
        {"grads": grads}


@pytest.fixture(scope="module")
def runs():
    per_rank = run_on_ranks(_ranks, 2, (), timeout_s=300)
    return {tp: [r[tp] for r in per_rank] for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_hybrid_stage_matches_float64_reference(runs, tp, name):
    ref = reference(name)
    per_rank = runs[tp]
    got = per_rank[0][name]
    fuse = _config(name).fuse
    if fuse.loss == "uld":
        keys = ["loss/ce", "loss/uld", "loss/gld", "loss/total"]
    else:
        keys = ["loss/ce", "loss/hybrid", "loss/matched", "loss/unmatched", "loss/total"] + \
            (["loss/tail"] if fuse.tail_bucket else []) + ([] if CASES[name][3] else ["loss/gld"])
    for k in keys:
        # the stage gets the teacher log-probs in fp32, as shards and the wire carry them
        assert abs(got["red"][k] - ref[k]) <= 1e-6 * abs(ref[k]) + 1e-7, (name, k, got["red"][k],
                                                                         ref[k])
    assert abs(got["objective"] - ref["loss/total"]) <= 1e-6 * abs(ref["loss/total"])
    for i, g_ref in enumerate(ref["grads"]):
        g = torch.cat([r[name]["grads"][i] for r in per_rank[:tp]], -1)   # TP1: each rank whole
        torch.testing.assert_close(g, g_ref, atol=1e-7, rtol=1e-6, msg=f"{name} grad {i}")
        assert torch.all(g[..., VOCAB:] == 0)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_diagnostics_match_reference(runs, tp, name):
    """fuse.grad_diagnostics: each term's gradient norm at the logits over the step and its cosine
    with the CE's equal the float64 reference's (separate autograd per term)."""
    ref, got = reference(name), runs[tp][0][name]["red"]
    term = _config(name).fuse.loss
    if name == "identity":          # the hybrid gradient is rounding noise: its cosine is too
        assert got["grad/hybrid"] < 1e-6 * got["grad/ce"] and ref["grad/hybrid"] < 1e-9
        assert abs(got["grad/ce"] - ref["grad/ce"]) <= 1e-6 * ref["grad/ce"]
        return
    for k in ["grad/ce", f"grad/{term}", f"grad/{term}_over_ce", f"grad/cos_{term}_ce"] + \
            ([] if CASES[name][3] else ["grad/gld", "grad/gld_over_ce", "grad/cos_gld_ce"]):
        assert abs(got[k] - ref[k]) <= 1e-6 * abs(ref[k]) + 1e-7, (name, tp, k, got[k], ref[k])
    assert not any(k.endswith(("_sq", "_dot_ce")) for k in got if k.startswith("grad/"))


def test_reference_cases_are_not_trivial():
    ref = reference("tail_adaptive_gld")
    assert ref["loss/matched"] > 0.05 and ref["loss/unmatched"] > 0.01 and ref["loss/tail"] != 0
    assert ref["loss/gld"] > 0
    ref = reference("ties_avgce")
    assert ref["loss/matched"] > 0.05 and ref["loss/unmatched"] > 0.01
    ref = reference("uld_gld")
    assert ref["loss/uld"] > 0.05 and ref["loss/gld"] > 0
    for name in ("uld_gld", "tail_adaptive_gld"):        # the diagnostics are not degenerate
        ref = reference(name)
        term = _config(name).fuse.loss
        assert ref[f"grad/{term}"] > 1e-3 and ref["grad/gld"] > 1e-3
        assert 0.01 < abs(ref[f"grad/cos_{term}_ce"]) < 0.99, ref


def test_identity_teacher_hybrid_vanishes(runs):
    """Teacher = the student, identity match: every top-K entry matched, KL = tail = ULD_U = 0,
    so the stage's total is its CE."""
    for tp in (1, 2):
        red = runs[tp][0]["identity"]["red"]
        for k in ("loss/hybrid", "loss/matched", "loss/unmatched", "loss/tail"):
            assert abs(red[k]) < 1e-6, (tp, k, red[k])
        assert red["teacher/self/matched_mass"] == 1.0
        assert abs(red["loss/total"] - red["loss/ce"]) < 1e-5 * red["loss/ce"]
