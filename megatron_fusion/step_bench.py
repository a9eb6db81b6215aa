"""Student step benchmark: CE-only vs CE + ULD + GLD on the same model, one process.

Used by ``tools/bench_gpu.py`` (one H100/H200, BF16, Transformer Engine when it imports) and
smoke-tested on CPU with a tiny model. Both variants run in the same process on the same model
and data, their steps interleaved, so their ratio cancels machine noise. Teacher top-K is synthetic (sorted random values,
random ids, all positions aligned): the cost of the fusion losses does not depend on its values.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from megatron_fusion.config import Config, load_config


def model_flops_per_step(cfg: Config) -> float:
    """Training FLOPs of one global batch: 6·N·T for the matmuls plus causal attention scores."""
    m = cfg.model
    h, L, s = m.hidden_size, m.num_layers, m.seq_length
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    ffn = m.ffn_size * (3 if m.swiglu else 2)
    per_layer = h * h * 2 + 2 * h * kv + ffn * h           # q, o, k, v, mlp weights
    n_matmul = L * per_layer + h * m.padded_vocab_size(1)   # + output layer
    tokens = cfg.train.global_batch * s
    attn = 2 * 2 * L * s * h * tokens / 2                   # QK^T and AV, causal half, fwd
    return 6.0 * n_matmul * tokens + 3.0 * attn


def synthetic_topk(b: int, s: int, k: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, s, k, generator=g).sort(dim=-1, descending=True).values * 2 + 3
    ids = torch.randint(0, vocab, (b, s, k), generator=g)
    return values, ids


def setup(cfg: Config) -> dict:
    """One student model + optimizer and, on the same micro-batches, a stage per variant:
    ``ce`` (SFTStage, CE only) and ``fusion`` (FuseStage, CE + ULD + GLD on synthetic top-K)."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads

    from megatron_fusion.model import build_model
    from megatron_fusion.parallel import init_student_groups
    from megatron_fusion.stages.fuse import FuseStage
    from megatron_fusion.teachers.online.protocol import batch_fingerprint
    from megatron_fusion.stages.sft import SFTStage
    from megatron_fusion.train import build_optimizer, wrap_ddp

    groups = init_student_groups(cfg.parallel.tp, cfg.parallel.pp)
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    chunks = build_model(cfg)
    model = wrap_ddp(cfg, chunks, chunks[0].config)
    optimizer, _ = build_optimizer(cfg, model)
    tcfg = chunks[0].config
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.no_sync_func = model[0].no_sync
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    mb, s, V = cfg.train.micro_batch, cfg.model.seq_length, cfg.model.vocab_size
    n_micro = cfg.train.global_batch // mb
    g = torch.Generator().manual_seed(1)
    micro = []
    for i in range(n_micro):
        tokens = torch.randint(0, V, (mb, s + 1), generator=g)
        micro.append({"tokens": tokens[:, :-1].to(dev), "labels": tokens[:, 1:].to(dev),
                      "loss_mask": torch.ones(mb, s, device=dev),
                      "position_ids": torch.arange(s, device=dev).expand(mb, s).contiguous(),
                      "sample_id": torch.arange(i * mb, (i + 1) * mb)})
    teachers = [type("T", (), {"name": f"t{j}"})() for j in range(len(cfg.fuse.teachers))]
    fuse = FuseStage(cfg, V, groups, teachers=teachers)
    fused_micro = []
    for bi, batch in enumerate(micro):
        batch = dict(batch, teachers=[])
        for j in range(len(teachers)):
            v, ids = synthetic_topk(mb, s, cfg.fuse.k, V, seed=bi * 31 + j)
            batch["teachers"].append({"values": v.to(dev), "ids": ids.to(dev),
                                      "mask": torch.ones(mb, s, dtype=torch.bool, device=dev),
                                      "ce": None,
                                      "fingerprint": batch_fingerprint(batch["sample_id"])})
        fused_micro.append(batch)
    n = float(n_micro * mb * s)
    fuse._norm = torch.tensor([n] + [n, float(n_micro * mb)] * len(teachers), dtype=torch.float64)
    return {"model": model, "optimizer": optimizer, "dev": dev, "mb": mb, "s": s,
            "n_micro": n_micro,
            "variants": {"ce": (SFTStage(V, groups.tp), micro, "loss/ce"),
                         "fusion": (fuse, fused_micro, "loss/total")}}


def step(env: dict, variant: str) -> tuple[float, float, float]:
    """One optimizer step of ``variant``: (seconds, loss, peak GiB on CUDA else nan)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_fusion.train import forward_step

    stage, micro, key = env["variants"][variant]
    model, optimizer, cuda = env["model"], env["optimizer"], env["dev"].type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    optimizer.zero_grad()
    for m in model:
        m.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, stage), data_iterator=iter(micro),
        model=model[0], num_microbatches=env["n_micro"], seq_length=env["s"],
        micro_batch_size=env["mb"], forward_only=False)
    tot = sum(r[key] for r in reports)
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return dt, float(tot[0] / tot[1]), peak


def run(cfg: Config, *, fusion: bool, steps: int, warmup: int) -> dict:
    """One variant alone: median step time (s) over ``steps`` after ``warmup``, and the losses."""
    env = setup(cfg)
    times, losses, peaks = [], [], []
    for it in range(warmup + steps):
        dt, loss, peak = step(env, "fusion" if fusion else "ce")
        losses.append(loss)
        if it >= warmup:
            times.append(dt)
            peaks.append(peak)
    return {"step_s": statistics.median(times), "peak_gib": max(peaks), "losses": losses}


def bench(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """CE-only and fusion steps interleaved on one model (CE, fusion, fusion, CE, ...), so load
    drift on the machine hits both alike; medians over ``steps`` of each after ``warmup``."""
    cfg = load_config(config, overrides)
    env = setup(cfg)
    res = {v: {"times": [], "losses": [], "peaks": []} for v in ("ce", "fusion")}
    for it in range(warmup + steps):
        for v in (("ce", "fusion") if it % 2 == 0 else ("fusion", "ce")):
            dt, loss, peak = step(env, v)
            res[v]["losses"].append(loss)
            if it >= warmup:
                res[v]["times"].append(dt)
                res[v]["peaks"].append(peak)
    ce, fu = ({"step_s": statistics.median(r["times"]), "peak_gib": max(r["peaks"]),
               "losses": r["losses"]} for r in (res["ce"], res["fusion"]))
    flops = model_flops_per_step(cfg)
    # per-pair ratios: each fusion step against the CE step next to it
    pairs = [f / c for f, c in zip(res["fusion"]["times"], res["ce"]["times"])]
    return {"ce": ce, "fusion": fu, "ratio": fu["step_s"] / ce["step_s"],
            "ratio_pairs_median": statistics.median(pairs),
            "tflops_ce": flops / ce["step_s"] / 1e12, "tflops_fusion": flops / fu["step_s"] / 1e12,
            "flops_per_step": flops}
