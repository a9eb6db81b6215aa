"""One-GPU student step: CE only vs CE + ULD + GLD (ratio), TFLOP/s and MFU, BF16 (+TE if present).

    python tools/bench_gpu.py                       # the 1.5B default below, on one H100/H200
    python tools/bench_gpu.py --cpu-smoke           # tiny model on CPU: checks the script runs

Runs both variants in one process on the same model and data, steps interleaved (a ratio taken in
one run); times are medians.
MFU is against --peak-tflops (H100/H800 SXM dense BF16: 989).
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT = ["model.num_layers=24", "model.hidden_size=2048", "model.num_attention_heads=16",
           "model.num_query_groups=4", "model.ffn_hidden_size=5632", "model.vocab_size=151936",
           "model.seq_length=4096", "train.micro_batch=1", "train.global_batch=4",
           "train.precision=bf16", "fuse.k=10"]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=176", "model.vocab_size=1000",
        "model.seq_length=64", "train.micro_batch=2", "train.global_batch=4", "train.precision=fp32"]
TEACHERS = ['fuse.teachers=[{name: a, topk_dir: x}, {name: b, topk_dir: y}]']


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--cpu-smoke", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    from megatron_fusion.parallel import init_distributed

    init_distributed()
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_gpu: no CUDA device (use --cpu-smoke for a CPU check)", file=sys.stderr)
        return 2
    base = TINY if args.cpu_smoke else DEFAULT
    from megatron_fusion.step_bench import bench

    r = bench(None, base + TEACHERS + ["stage=fuse", "logging.wandb_mode=disabled"] + overrides,
              args.steps, args.warmup)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {dev}")
    print("| variant | step (s) | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|")
    for name, key in (("CE only", "ce"), ("CE + ULD + GLD (2 teachers)", "fusion")):
        t = r[f"tflops_{key}"]
        print(f"| {name} | {r[key]['step_s']:.4f} | {t:.1f} | {t / args.peak_tflops:.1%} | "
              f"{r[key]['peak_gib']:.1f} |")
    print(f"fusion / CE step-time ratio: {r['ratio']:.3f} (medians; median of adjacent-step "
          f"ratios {r['ratio_pairs_median']:.3f})")
    print(json.dumps({k: v for k, v in r.items()}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
