"""Bytes per aligned position and log-prob recovery error of the top-K shard formats (methods.md §6).

    python tools/bench_topk_storage.py [--vocab 49152] [--positions 256] [--k 10]

Synthetic teacher logits (``randn * 2.5`` over ``--vocab``, half the positions peaked: 7 tokens
18 .. 4 above the rest), at bf16, fp16 and fp32. For each: the top-K and its log-probs as the
precompute computes them (``standardized_topk``, ``topk_logprob_stats``), written to a format-4
shard (``dtype logp16``) and a format-3 shard (bf16 values) and read back. Prints, per teacher
dtype, the largest error of the recovered top-K log-probs against ``log_softmax`` of the logits
(float64) at the top-K ids: format 4 as stored, and bf16 values + fp32 ``(d, c)`` (the
alternative methods.md §9 rejects), the largest difference of format 4's derived standardised
values from ``standardized_topk``'s, and each format's bytes per aligned position (file payload
over positions, index row excluded).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)

    import torch

    from megatron_fusion.losses import standardized_topk
    from megatron_fusion.teachers.logprobs import recover_logprobs, topk_logprob_stats
    from megatron_fusion.teachers.shards import (LOGP_DTYPE, TopKHeader, TopKReader, TopKWriter,
                                                 read_topk_header)

    g = torch.Generator().manual_seed(1)
    n, k = args.positions, args.k
    base = torch.randn(n, args.vocab, generator=g) * 2.5
    base[: n // 2, :7] += torch.linspace(18, 4, 7)
    mask = torch.ones(n, dtype=torch.bool)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}; V = {args.vocab}, K = {k}, {n} positions\n")
    print("| teacher logits | format 4: max error (nats) | bf16 a + fp32 (d, c): max error | "
          "format 4 a vs standardized_topk | B/position format 4 | B/position format 3 |")
    print("|---|---|---|---|---|---|")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        z = base.to(dt)
        a, ids = standardized_topk(z, k, eps=1e-6)
        lp, d, c = topk_logprob_stats(z, ids, eps=1e-6)
        ref = torch.log_softmax(z.double(), -1).gather(-1, ids)
        size = {}
        with tempfile.TemporaryDirectory() as tmp:
            for dtype in (LOGP_DTYPE, "bfloat16"):
                p = Path(tmp) / f"{dtype}.topk"
                h = TopKHeader(teacher="t", teacher_tokenizer_hash="-", pivot_tokenizer_hash="-",
                               k=k, dataset_hash="-", dtype=dtype)
                with TopKWriter(p, h) as w:
                    w.add(0, a, ids, mask, logprobs=(lp, d, c) if dtype == LOGP_DTYPE else None)
                index_row = 40
                size[dtype] = (read_topk_header(p)["payload_bytes"] - index_row) / n
                if dtype == LOGP_DTYPE:
                    vals, _, _, got = TopKReader(p).get(0, logprobs=True)
        old = recover_logprobs(a.to(torch.bfloat16), d.float(), c.float())
        print(f"| {str(dt).split('.')[-1]} | {(got.double() - ref).abs().max():.2e} | "
              f"{(old.double() - ref).abs().max():.2e} | {(vals - a).abs().max():.2e} | "
              f"{size[LOGP_DTYPE]:.3f} | {size['bfloat16']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
