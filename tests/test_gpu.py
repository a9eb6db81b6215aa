"""GPU-only checks (FP8 through Transformer Engine, CUDA loss kernels, the GPU benchmark).

On a machine without CUDA every test here skips, saying why. On a lent H100/H200 run
``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (none on this machine)")


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


needs_te = pytest.mark.skipif(not _te_importable(),
                              reason="needs Transformer Engine on a CUDA GPU (FP8 path)")

SMALL = ["model.num_layers=4", "model.hidden_size=1024", "model.num_attention_heads=8",
         "model.num_query_groups=4", "model.ffn_hidden_size=2816", "model.vocab_size=32000",
         "model.seq_length=1024", "train.micro_batch=2", "train.global_batch=4",
         "train.precision=bf16", "stage=fuse", "logging.wandb_mode=disabled",
         "fuse.teachers=[{name: a, topk_dir: x}]", "optim.lr=1e-4"]


def _run(rank, world, overrides, fusion):
    from megatron_fusion.config import load_config
    from megatron_fusion.step_bench import run

    return run(load_config(None, SMALL + overrides), fusion=fusion, steps=5, warmup=0)


@needs_te
def test_fp8_steps_track_bf16_within_1_percent():
    from megatron_fusion.local_ranks import run_on_ranks

    bf16 = run_on_ranks(_run, 1, ([], True), timeout_s=600)[0]
    fp8 = run_on_ranks(_run, 1, (["train.fp8=hybrid", "train.fp8_recipe=delayed"], True), timeout_s=600)[0]
    for a, b in zip(fp8["losses"], bf16["losses"]):
        assert abs(a - b) <= 0.01 * abs(b), (fp8["losses"], bf16["losses"])


@needs_cuda
def test_losses_on_cuda_match_cpu():
    from megatron_fusion.losses import gld_loss, standardized_topk, uld_loss

    torch.manual_seed(0)
    z = torch.randn(2, 64, 1000, dtype=torch.float32)
    tv = torch.randn(2, 64, 10).sort(-1, descending=True).values
    ti = torch.randint(0, 500, (2, 64, 10))
    mask = torch.rand(2, 64) > 0.3
    out = {}
    for dev in ("cpu", "cuda"):
        zz = z.to(dev).requires_grad_()
        u, _ = uld_loss(zz, tv.to(dev), mask.to(dev), k=10, vocab_size=997)
        g, _ = gld_loss(zz, tv.to(dev), ti.to(dev), mask.to(dev), k=10, vocab_size=997)
        (u + g).backward()
        v, i = standardized_topk(zz.detach(), 10, vocab_size=997)
        out[dev] = (u.item(), g.item(), zz.grad.cpu(), i.cpu())
    assert abs(out["cpu"][0] - out["cuda"][0]) < 1e-4 and abs(out["cpu"][1] - out["cuda"][1]) < 1e-4
    assert torch.allclose(out["cpu"][2], out["cuda"][2], atol=1e-5)
    assert torch.equal(out["cpu"][3], out["cuda"][3])


@needs_cuda
def test_bench_gpu_fusion_overhead_is_measured():
    from megatron_fusion.local_ranks import run_on_ranks

    ce = run_on_ranks(_run, 1, ([], False), timeout_s=600)[0]
    fu = run_on_ranks(_run, 1, ([], True), timeout_s=600)[0]
    assert ce["step_s"] > 0 and fu["step_s"] > 0 and fu["peak_gib"] > 0
