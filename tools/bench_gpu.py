"""One-GPU student step through the real training loop: CE only vs CE + ULD + GLD, TFLOP/s, MFU.

    python tools/bench_gpu.py --config configs/test/gpu_check_1b.yaml --steps 20   # one H100/H200
    python tools/bench_gpu.py --cpu-smoke --steps 2 --warmup 1                # tiny, on CPU

Makes the inputs first (``tools/make_synthetic_topk.py``: long SFT samples, the demo pivot
tokenizer, synthetic top-K shards for the config's teachers, at the config's seq_length, k and
vocab_size) unless ``--data-dir`` already holds them, then launches the trainer once per variant
(``tools/step_bench.py``) and reads its metrics.jsonl. MFU is against --peak-tflops
(H100/H800/H200 SXM dense BF16: 989) and against --gemm-tflops (788: the bf16 GEMM rate measured
on this workplace's H200).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=176", "model.vocab_size=1000",
        "model.seq_length=64", "train.micro_batch=2", "train.global_batch=4",
        "train.precision=fp32", "parallel.tp=1", "optim.clip_grad=0",
        "fuse.teachers=[{name: a}, {name: b}]"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "test/gpu_check_1b.yaml"))
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    ap.add_argument("--variants", default="ce,fusion")
    ap.add_argument("--data-dir", default=None,
                    help="synthetic inputs (made here when it has no manifest.json); default: a "
                    "folder under --work-dir")
    ap.add_argument("--samples", type=int, default=None,
                    help="SFT samples to make (default: 2 global batches)")
    ap.add_argument("--work-dir", default=None, help="run directories (default: a temp dir)")
    ap.add_argument("--log-dir", default=None, help="write each trainer launch's output here")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per trainer launch")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--gemm-tflops", type=float, default=788.0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, fp32, on the CPU")
    args, overrides = ap.parse_known_args(argv)

    import tempfile

    import torch

    from make_synthetic_topk import make_synthetic_fuse_data
    from megatron_fusion.config import ConfigError, load_config
    from step_bench import BenchError, bench, table

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_gpu: needs a CUDA GPU (use --cpu-smoke for a CPU check)", file=sys.stderr)
        return 2
    config = str(ROOT / "configs" / "test/tiny_cpu.yaml") if args.cpu_smoke else args.config
    base = TINY if args.cpu_smoke else []
    try:
        cfg = load_config(config, base + overrides + ["stage=fuse"])
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_gpu_"))
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    manifest = data_dir / "manifest.json"
    if manifest.exists():
        man = json.loads(manifest.read_text())
    else:
        vocab = cfg.model.vocab_size
        if vocab <= 0:
            print("bench_gpu: model.vocab_size must be set (the synthetic top-K ids need it)",
                  file=sys.stderr)
            return 2
        man = make_synthetic_fuse_data(
            data_dir, seq_len=cfg.model.seq_length, teachers=[t.name for t in cfg.fuse.teachers],
            samples=args.samples or 2 * cfg.train.global_batch, k=cfg.fuse.k, vocab=vocab)
    try:
        res = bench(config, base + overrides + man["overrides"], steps=args.steps,
                    warmup=args.warmup, variants=tuple(args.variants.split(",")),
                    peak_tflops=args.peak_tflops, gemm_tflops=args.gemm_tflops,
                    work_dir=work / "runs", timeout_s=args.timeout, log_dir=args.log_dir)
    except BenchError as e:
        print(f"bench_gpu: {e}", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps({"error": str(e)}))
        return 1
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res.update(device=dev, torch=torch.__version__, data=str(data_dir),
               response_fraction=man.get("response_fraction"))
    print(f"device: {dev}; {res['tokens_per_step']} tokens/step, "
          f"{res['flops_per_token'] / 1e9:.2f} GFLOP/token (train)")
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
