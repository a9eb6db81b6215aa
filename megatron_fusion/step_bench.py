"""Student step benchmark: CE-only vs CE + ULD + GLD on the same model, one process.

Used by ``tools/bench_gpu.py`` (one H100/H200, BF16, Transformer Engine when it imports) and
smoke-tested on CPU with a tiny model. Both variants run in the same process on the same model
and data so their ratio cancels machine noise. Teacher top-K is synthetic (sorted random values,
random ids, all positions aligned): the cost of the fusion losses does not depend on its values.
"""

from __future__ import annotations

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


def run(cfg: Config, *, fusion: bool, steps: int, warmup: int) -> dict:
    """Mean step time (s) over ``steps`` after ``warmup``, CE only or CE + ULD + GLD."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_fusion.model import build_model
    from megatron_fusion.parallel import init_student_groups
    from megatron_fusion.stages.fuse import FuseStage, batch_fingerprint
    from megatron_fusion.stages.sft import SFTStage
    from megatron_fusion.train import build_optimizer, forward_step, wrap_ddp

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
        batch = {"tokens": tokens[:, :-1].to(dev), "labels": tokens[:, 1:].to(dev),
                 "loss_mask": torch.ones(mb, s, device=dev),
                 "position_ids": torch.arange(s, device=dev).expand(mb, s).contiguous(),
                 "sample_id": torch.arange(i * mb, (i + 1) * mb)}
        micro.append(batch)
    if fusion:
        teachers = [type("T", (), {"name": f"t{j}"})() for j in range(len(cfg.fuse.teachers))]
        stage = FuseStage(cfg, V, groups, teachers=teachers)
        for bi, batch in enumerate(micro):
            batch["teachers"] = []
            for j in range(len(teachers)):
                v, ids = synthetic_topk(mb, s, cfg.fuse.k, V, seed=bi * 31 + j)
                batch["teachers"].append({"values": v.to(dev), "ids": ids.to(dev),
                                          "mask": torch.ones(mb, s, dtype=torch.bool, device=dev),
                                          "ce": None, "fingerprint": batch_fingerprint(batch["sample_id"])})
        n = float(n_micro * mb * s)
        stage._norm = torch.tensor([n] + [n, float(n_micro * mb)] * len(teachers), dtype=torch.float64)
    else:
        stage = SFTStage(V, groups.tp)
    fb = get_forward_backward_func()
    times, losses = [], []
    for it in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad()
        for m in model:
            m.zero_grad_buffer()
        reports = fb(forward_step_func=partial(forward_step, stage), data_iterator=iter(micro),
                     model=model[0], num_microbatches=n_micro, seq_length=s, micro_batch_size=mb,
                     forward_only=False)
        key = "loss/total" if fusion else "loss/ce"
        tot = sum(r[key] for r in reports)
        losses.append(float(tot[0] / tot[1]))
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return {"step_s": sum(times) / len(times), "peak_gib": peak, "losses": losses}


def bench(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    cfg = load_config(config, overrides)
    ce = run(cfg, fusion=False, steps=steps, warmup=warmup)
    fu = run(cfg, fusion=True, steps=steps, warmup=warmup)
    flops = model_flops_per_step(cfg)
    return {"ce": ce, "fusion": fu, "ratio": fu["step_s"] / ce["step_s"],
            "tflops_ce": flops / ce["step_s"] / 1e12, "tflops_fusion": flops / fu["step_s"] / 1e12,
            "flops_per_step": flops}
