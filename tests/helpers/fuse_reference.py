"""Rank-side helpers and a float64 reference for the fuse-stage step-1 check
(tests/stages/test_fuse_reference.py) and the identity check (tests/stages/test_identity.py).

The reference is written from docs/methods.md §2-§4 only: it never calls megatron_fusion.losses.
"""

from __future__ import annotations

import json
from fractions import Fraction

import torch
import torch.distributed as dist

from megatron_fusion.config import load_config
from tests.helpers import trainer_ranks as tr


def step1_batches(cfg) -> list[dict]:
    """The step-1 micro-batches of a DP=1 run of ``cfg`` (rebuilt as the trainer builds them)."""
    from megatron_fusion.data.build import build_tokenizer
    from megatron_fusion.data.order import SampleOrder, collate, rank_microbatches
    from megatron_fusion.stages import stage_class

    tok = build_tokenizer(cfg)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    ds = stage_class(cfg.stage).build_dataset(cfg, tok)
    order = SampleOrder(len(ds), cfg.train.seed)
    return rank_microbatches(ds, order, 0, cfg, 1, 0, collate_fn=collate)


def initial_logits(ckpt: str, micro: list[dict]) -> list[torch.Tensor]:
    """Logits [b, s, v_padded] of the weights in ``ckpt`` on each micro-batch: a plain TP1 model
    (the checkpoint loaded by MegatronTeacherBackend), the same forward as the trainer's."""
    from megatron_fusion.parallel import destroy_student_groups, init_student_groups
    from megatron_fusion.teachers.backends import MegatronTeacherBackend

    init_student_groups(tp=1)
    model = MegatronTeacherBackend(ckpt).model
    out = []
    with torch.no_grad():
        for mb in micro:
            out.append(model(mb["tokens"], mb["position_ids"], None).float().clone())
    del model
    destroy_student_groups()
    return out


def fuse_step1_ranks(rank, world, data, fuse, root, layouts, reference):
    """(1 rank: write the TP1 init.) Train 1 fusion step from it under each layout; rank 0
    returns {name: step-1 metrics}, and with ``reference`` the micro-batches + initial logits."""
    from megatron_fusion.parallel import destroy_student_groups
    from megatron_fusion.train import train

    if reference:
        tr.make_init(rank, world, data, root, [("init", [])])
    out = {}
    for name, extra in layouts:
        run_dir = f"{root}/{name}"
        cfg = load_config(None, tr.tiny_overrides(data, run_dir) + tr.fuse_overrides(fuse)
                          + ["train.steps=1", f"checkpoint.load={root}/init"] + extra)
        train(cfg)
        destroy_student_groups()
        dist.barrier()
        if rank == 0:
            with open(f"{run_dir}/metrics.jsonl") as fh:
                out[name] = next(r for r in map(json.loads, fh) if r.get("step") == 1
                                 and "loss/total" in r)
    if reference and rank == 0:
        cfg = load_config(None, tr.tiny_overrides(data, f"{root}/ref") + tr.fuse_overrides(fuse))
        micro = step1_batches(cfg)
        out["micro"] = micro
        out["logits"] = initial_logits(f"{root}/init", micro)
        out["vocab"] = cfg.model.vocab_size
        out["seq"] = cfg.model.seq_length
    return out


# --- float64 reference (methods.md §2-§4) ---------------------------------------------------

def standardised_topk(z: torch.Tensor, k: int, eps: float = 1e-6):
    """z [..., V] over the TRUE vocab -> (values, ids) of the K largest z-scores, descending."""
    z = z.double()
    mu = z.mean(-1, keepdim=True)
    sd = ((z - mu) ** 2).mean(-1, keepdim=True).sqrt()                       # population std
    top = torch.topk((z - mu) / (sd + eps), k, dim=-1)
    return top.values, top.indices


def uld_position(a_s: torch.Tensor, a_t: torch.Tensor, temperature: float = 1.0) -> float:
    p_s = torch.softmax(a_s.double() / temperature, -1).sort(descending=True).values
    p_t = torch.softmax(a_t.double() / temperature, -1).sort(descending=True).values
    return float((p_s - p_t).abs().sum())


def eccentricities(values: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """values, ids [R, K] of one model over a sequence's masked positions -> ecc per node:
    C[u,v] = (1/|R|) sum_t a_t[u] a_t[v];  ecc[u] = sum_v C[u,v] / n_nodes."""
    nodes = sorted(set(ids.flatten().tolist()))
    col = {u: i for i, u in enumerate(nodes)}
    r, n = values.shape[0], len(nodes)
    a = torch.zeros(r, n, dtype=torch.float64)
    for t in range(r):
        for j in range(values.shape[1]):
            a[t, col[int(ids[t, j])]] += float(values[t, j])
    c = a.T @ a / r                                                          # the graph itself
    return (c.sum(1) / n).tolist()


def wasserstein1(x: list[float], y: list[float]) -> float:
    """Exact 1-D W1 of two uniform empirical distributions: integral of |F_x^-1 - F_y^-1|."""
    xs, ys = sorted(x), sorted(y)
    n, m = len(xs), len(ys)
    cuts = sorted({Fraction(i, n) for i in range(n + 1)} | {Fraction(j, m) for j in range(m + 1)})
    total = 0.0
    for lo, hi in zip(cuts, cuts[1:]):
        mid = (lo + hi) / 2
        total += float(hi - lo) * abs(xs[int(mid * n)] - ys[int(mid * m)])
    return total


def reference_losses(micro, logits, teachers, vocab: int, k: int, weights,
                     lambdas=(1.0, 1.0, 0.5), temperature: float = 1.0) -> dict:
    """CE, ULD, GLD and total of one step from the micro-batches, the initial logits and each
    teacher's (values, ids, aligned) per micro-batch (``teachers[j][i]``), every term divided by
    its global count (N_ce response tokens, N_uld_j aligned response positions, N_gld_j sequences
    with any). Plain float64 loops over positions."""
    ce_sum, n_ce = 0.0, 0
    uld = [0.0] * len(teachers)
    gld = [0.0] * len(teachers)
    n_uld = [0] * len(teachers)
    n_gld = [0] * len(teachers)
    for i, (mb, z) in enumerate(zip(micro, logits)):
        z = z[..., :vocab].double()
        lsm = torch.log_softmax(z, -1)
        a_s, id_s = standardised_topk(z, k)
        b, s = mb["tokens"].shape
        for bi in range(b):
            resp = mb["loss_mask"][bi] > 0
            for t in range(s):
                if resp[t]:
                    ce_sum -= float(lsm[bi, t, mb["labels"][bi, t]])
                    n_ce += 1
            for j, tch in enumerate(teachers):
                values, ids, aligned = tch[i]
                pos = [t for t in range(s) if resp[t] and aligned[bi, t]]
                for t in pos:
                    uld[j] += weights[j] * uld_position(a_s[bi, t], values[bi, t], temperature)
                n_uld[j] += len(pos)
                if pos:
                    ecc_s = eccentricities(a_s[bi, pos], id_s[bi, pos])
                    ecc_t = eccentricities(values[bi, pos].double(), ids[bi, pos])
                    gld[j] += weights[j] * wasserstein1(ecc_s, ecc_t)
                    n_gld[j] += 1
    ce = ce_sum / n_ce
    l_uld = sum(u / n for u, n in zip(uld, n_uld) if n)
    l_gld = sum(g / n for g, n in zip(gld, n_gld) if n)
    return {"loss/ce": ce, "loss/uld": l_uld, "loss/gld": l_gld,
            "loss/total": lambdas[0] * ce + lambdas[1] * l_uld + lambdas[2] * l_gld,
            "n_ce": n_ce, "n_uld": n_uld, "n_gld": n_gld}


def identity_ranks(rank, world, data, root):
    """Teacher = the pivot itself: its top-K precomputed (Megatron backend, pivot tokenizer) from
    the step-0 checkpoint, then one fusion step against it from that checkpoint (ULD, and
    fuse.loss=hybrid with the tail bucket); and the hybrid loss on the initial logits with the
    identity vocabulary match (1 rank)."""
    from megatron_fusion.data.build import build_tokenizer
    from megatron_fusion.losses.hybrid import hybrid_loss
    from megatron_fusion.parallel import destroy_student_groups, init_student_groups
    from megatron_fusion.stages import stage_class
    from megatron_fusion.teachers.backends import MegatronTeacherBackend
    from megatron_fusion.teachers.precompute import precompute_teacher_topk
    from megatron_fusion.teachers.vocab_match import VocabMatch
    from megatron_fusion.train import train

    tr.make_init(rank, world, data, root, [("init", [])])
    fuse = {"teachers": [{"name": "self", "tokenizer": data["pivot_tokenizer"],
                          "topk_dir": f"{root}/self_topk"}]}
    cfg = load_config(None, tr.tiny_overrides(data, f"{root}/fuse") + tr.fuse_overrides(fuse)
                      + ["train.steps=1", f"checkpoint.load={root}/init"])
    tok = build_tokenizer(cfg)
    ds = stage_class("fuse").build_dataset(cfg, tok)                 # the trainer's dataset
    groups = init_student_groups(tp=1)
    summary = precompute_teacher_topk(ds, tok, MegatronTeacherBackend(f"{root}/init"),
                                      f"{root}/self_topk", teacher="self", samples_per_shard=64,
                                      batch_size=8, progress=False)
    destroy_student_groups()
    train(cfg)
    destroy_student_groups()
    with open(f"{root}/fuse/metrics.jsonl") as fh:
        step1 = next(r for r in map(json.loads, fh) if r.get("step") == 1 and "loss/total" in r)
    # the same step with fuse.loss=hybrid (+ tail bucket): the stage builds the identity match
    train(load_config(None, tr.tiny_overrides(data, f"{root}/fuse_hybrid") + tr.fuse_overrides(fuse)
                      + ["train.steps=1", f"checkpoint.load={root}/init", "fuse.loss=hybrid",
                         "fuse.tail_bucket=true"]))
    destroy_student_groups()
    with open(f"{root}/fuse_hybrid/metrics.jsonl") as fh:
        hybrid_step1 = next(r for r in map(json.loads, fh) if r.get("step") == 1
                            and "loss/total" in r)

    micro = step1_batches(load_config(None, tr.tiny_overrides(data, f"{root}/ref")
                                      + tr.fuse_overrides(fuse)))
    logits = initial_logits(f"{root}/init", micro)
    groups = init_student_groups(tp=1)
    match = VocabMatch.build(tok, tok)
    v = tok.vocab_size
    hybrid = []
    for mb, z in zip(micro, logits):
        t_lp = torch.log_softmax(z[..., :v].double(), -1).topk(10, dim=-1)   # the teacher = z
        mids = match.map_ids(t_lp.indices)
        s, n = hybrid_loss(z, t_lp.values.float(), mids, mb["loss_mask"] > 0, k=10,
                           vocab_size=v, tp_group=groups.tp)
        hybrid.append((float(s), float(n), bool(((mids == t_lp.indices) | (mids < 0)).all()),
                       int((mids < 0).sum())))
    destroy_student_groups()
    return {"precompute": summary, "step1": step1, "hybrid": hybrid, "hybrid_step1": hybrid_step1,
            "matched_fraction": match.matched_fraction, "vocab": v,
            "identity_where_matched": bool(torch.equal(match.teacher_ids, match.pivot_ids)),
            "unmatched_kinds": sorted({kind for i, (_, kind) in enumerate(tok.vocab_pieces())
                                       if i not in set(match.teacher_ids.tolist())})}
