"""GPU-only checks (FP8 through Transformer Engine, CUDA loss kernels, the real-loop GPU benchmark).

On a machine without CUDA every test here skips, saying why. On a lent H100/H200 run
``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

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
         "train.precision=bf16", "parallel.tp=1", "optim.lr=1e-3", "optim.warmup_steps=0",
         "optim.decay=constant"]
BASE = str(Path(__file__).resolve().parents[1] / "configs" / "test/tiny_cpu.yaml")


def _small_inputs(tmp_path) -> list[str]:
    """Synthetic SFT data, pivot tokenizer and 2 teachers' top-K at SMALL's shape: overrides."""
    from tools.make_synthetic_topk import make_synthetic_fuse_data

    man = make_synthetic_fuse_data(tmp_path / "data", seq_len=1024, samples=8, teachers=["a", "b"],
                                   k=10, vocab=32000)
    return SMALL + man["overrides"]


@needs_te
def test_fp8_steps_track_bf16_within_1_percent(tmp_path):
    """The real loop, fuse stage, 5 steps: FP8 (TE, delayed scaling) losses within 1% of bf16."""
    from tools.step_bench import run_variant

    ov = _small_inputs(tmp_path) + ["model.transformer_impl=transformer_engine"]
    bf16 = run_variant(BASE, ov, variant="fusion", steps=5, warmup=0,
                       run_dir=tmp_path / "bf16")
    fp8 = run_variant(BASE, ov + ["train.fp8=hybrid", "train.fp8_recipe=delayed"],
                      variant="fusion", steps=5, warmup=0, run_dir=tmp_path / "fp8")
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
def test_bench_gpu_real_loop_is_measured(tmp_path):
    """CE-only and CE + ULD + GLD through the real trainer on CUDA: both variants train (finite,
    falling CE) and the benchmark derives tokens/s, TFLOP/s and the ratio from their metrics."""
    import math

    from tools.step_bench import bench

    res = bench(BASE, _small_inputs(tmp_path), steps=4, warmup=1,
                work_dir=tmp_path / "runs")
    for v in ("ce", "fusion"):
        r = res["variants"][v]
        assert r["steps"] == 4 and r["step_s"] > 0 and r["tflops"] > 0
        assert all(math.isfinite(x) for x in r["losses"]), r["losses"]
        assert r["loss_ce"][-1] < r["loss_ce"][0], r["loss_ce"]
    fu, ce = res["variants"]["fusion"], res["variants"]["ce"]
    assert all(x > 0 for x in fu["loss_uld"] + fu["loss_gld"]), (fu["loss_uld"], fu["loss_gld"])
    assert ce["loss_uld"] == [None] * 4                         # stage sft: no fusion terms
    assert 0.5 < res["ratio"] < 10
