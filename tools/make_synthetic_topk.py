"""Synthetic fuse-stage inputs made on the spot: long SFT samples, a pivot tokenizer, teacher top-K.

    python tools/make_synthetic_topk.py --out runs/gpu_check/data --seq-len 4096 --samples 64 \
        --teachers t0,t1 --k 10 --vocab 151936 [--hf-teacher runs/gpu_check/data/hf_teacher]

For benchmarks and the GPU check, where no network reaches a real model or data set:
- the demo's SentencePiece pivot tokenizer and tasks (``megatron_fusion.data.tiny``), the tasks
  concatenated into samples whose response fills ``--seq-len`` (so nearly every position is a
  response position, as in long-context SFT, and the losses see full sequences);
- per teacher, top-K shards written with the project's own ``TopKWriter`` over that data set,
  with the header fields the trainer's reader checks (teacher, k, dataset hash, pivot tokenizer
  hash): sorted random standardised values, random ids in ``[0, --vocab)``, about 95% of the
  positions aligned, a random teacher CE per sample (so minCE/avgCE weighting runs too). The
  cost of ULD/GLD does not depend on the values, so these time the real path. ``--logprobs``
  writes format-4 shards (dtype ``logp16``, what ``fuse.loss: hybrid`` reads): per position a
  random ``d = sigma + eps`` in [1.5, 3.5] and top-1 log-prob in [-2, -0.05], ``c`` such that
  ``log p = a d + c`` for the same sorted values ``a`` (read back to the 16-bit code's step);
- optionally a random-weight Hugging Face Llama sized for the pivot tokenizer (``--hf-teacher``)
  for ``tools/precompute_teacher_topk.py --backend hf``.

Writes ``manifest.json`` with the trainer overrides that point a config at these files. The SFT
dataset is built exactly as the trainer builds it (``SFTDataset(train, tokenizer, seq_len,
overflow=...)``), so the shards' dataset hash matches the run's. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _long_records(base: list[dict], n: int, chars: int, seed: int) -> list[dict]:
    """``n`` prompt/response records: a short prompt, a response of >= ``chars`` characters made
    of demo tasks worked one after the other."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts, size = [], 0
        while size < chars:
            r = base[rng.randrange(len(base))]
            parts.append(f"{r['prompt']}\n{r['response']}")
            size += len(parts[-1]) + 2
        out.append({"prompt": f"Work through task set {i}.", "response": "\n\n".join(parts)})
    return out


def make_synthetic_fuse_data(out: str | Path, *, seq_len: int, samples: int, teachers: list[str],
                             k: int = 10, vocab: int = 151936, seed: int = 0,
                             samples_per_shard: int = 32, overflow: str = "truncate",
                             aligned_fraction: float = 0.95, pivot_vocab: int = 512,
                             hf_teacher: str | Path | None = None,
                             logprobs: bool = False) -> dict:
    """Write the data, tokenizer, shards (and HF teacher); return the manifest (also on disk)."""
    import numpy as np
    import torch

    from megatron_fusion.data.jsonl import write_jsonl
    from megatron_fusion.data.sft import SFTDataset
    from megatron_fusion.data.tiny import make_demo_data
    from megatron_fusion.tokenizers import load_tokenizer
    from megatron_fusion.teachers.shards import LOGP_DTYPE, TopKHeader, TopKWriter

    if seq_len < 2 or samples < 1 or k < 1 or not teachers:
        raise ValueError("make_synthetic_topk: needs --seq-len >= 2, --samples >= 1, --k >= 1 and "
                         "at least one teacher name")
    if len(set(teachers)) != len(teachers):
        raise ValueError(f"make_synthetic_topk: duplicate teacher names {teachers}")
    if vocab < k:
        raise ValueError(f"make_synthetic_topk: --vocab {vocab} < --k {k}")
    out = Path(out)
    demo = make_demo_data(out / "demo", n_train=400, n_valid=8, seed=seed, pivot_vocab=pivot_vocab)
    tok = load_tokenizer(demo["pivot_tokenizer"])
    base = [json.loads(line) for line in open(demo["train"])]
    train = out / "train.jsonl"
    # ~2.5 characters per token with the 512-piece demo tokenizer; 4 leaves a margin, and the
    # check below grows the text when a sample still falls short
    records = _long_records(base, samples, 4 * seq_len, seed)
    write_jsonl(train, records)
    ds = SFTDataset(train, tok, seq_len, overflow=overflow)
    short = [i for i in range(len(ds)) if float(ds[i]["loss_mask"].sum()) < 0.9 * (seq_len - 1)]
    if short:
        records = _long_records(base, samples, 12 * seq_len, seed)
        write_jsonl(train, records)
        ds = SFTDataset(train, tok, seq_len, overflow=overflow)
    g = torch.Generator().manual_seed(seed)
    topk_dirs = {}
    for j, name in enumerate(teachers):
        tdir = out / "topk" / name
        for old in tdir.glob("*.topk") if tdir.is_dir() else []:
            old.unlink()
        n_shards = (len(ds) + samples_per_shard - 1) // samples_per_shard
        for si in range(n_shards):
            header = TopKHeader(teacher=name, teacher_tokenizer_hash=f"synthetic:{name}",
                                pivot_tokenizer_hash=tok.content_hash, k=k,
                                dataset_hash=ds.dataset_hash,
                                dtype=LOGP_DTYPE if logprobs else "bfloat16",
                                meta={"synthetic": True, "seed": seed, "generator":
                                      "tools/make_synthetic_topk.py"})
            with TopKWriter(tdir / f"{name}-{si:05d}.topk", header) as w:
                for i in range(si * samples_per_shard, min(len(ds), (si + 1) * samples_per_shard)):
                    item = ds[i]
                    values = (torch.randn(seq_len, k, generator=g) * 0.7 + 3.0 + 2.0 * j)
                    values = values.sort(dim=-1, descending=True).values
                    ids = torch.randint(0, vocab, (seq_len, k), generator=g)
                    aligned = torch.rand(seq_len, generator=g) < aligned_fraction
                    resp = int(item["loss_mask"].sum())
                    ce = float(torch.rand((), generator=g) * 2 + 1)
                    lp = None
                    if logprobs:   # a consistent (log p, d, c) for these values (module doc)
                        d = 1.5 + 2 * torch.rand(seq_len, generator=g, dtype=torch.float64)
                        top = -0.05 - 1.95 * torch.rand(seq_len, generator=g, dtype=torch.float64)
                        c = top - values[:, 0].double() * d
                        lp = (values.double() * d[:, None] + c[:, None], d, c)
                    w.add(int(item["sample_id"]), values, ids, aligned, teacher_ce=ce,
                          teacher_ce_tokens=resp, teacher_ce_byte=ce,    # synthetic: same number
                          teacher_ce_bytes=resp, logprobs=lp)           # per "byte" (minCE/avgCE)
        topk_dirs[name] = str(tdir)
    manifest = {
        "train": str(train), "tokenizer": demo["pivot_tokenizer"], "seq_len": seq_len,
        "samples": len(ds), "k": k, "vocab": vocab, "seed": seed, "topk_dirs": topk_dirs,
        "dataset_hash": ds.dataset_hash,
        "response_fraction": float(np.mean([float(ds[i]["loss_mask"].mean())
                                            for i in range(len(ds))])),
        "overrides": [f"data.train={train}", f"data.tokenizer={demo['pivot_tokenizer']}",
                      "data.valid=[]", f"data.overflow={overflow}", f"model.seq_length={seq_len}",
                      f"model.vocab_size={vocab}", f"fuse.k={k}",
                      "fuse.teachers=[" + ", ".join(f"{{name: {n}, topk_dir: {d}}}"
                                                    for n, d in topk_dirs.items()) + "]"],
    }
    if hf_teacher is not None:
        manifest["hf_teacher"] = str(make_hf_teacher(hf_teacher, tok.vocab_size, seed=seed))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def make_hf_teacher(out: str | Path, vocab_size: int, *, hidden: int = 512, layers: int = 4,
                    heads: int = 8, kv_heads: int = 4, ffn: int = 1408, max_pos: int = 8192,
                    seed: int = 0) -> Path:
    """A random-weight ``LlamaForCausalLM`` saved with ``save_pretrained`` (no tokenizer inside:
    pass the pivot tokenizer as the teacher's)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden,
                                   intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=max_pos)
    model = transformers.LlamaForCausalLM(cfg)
    out = Path(out)
    model.save_pretrained(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seq-len", type=int, required=True, help="pivot sequence length (model.seq_length)")
    ap.add_argument("--samples", type=int, default=64, help="SFT samples (the trainer cycles epochs)")
    ap.add_argument("--teachers", default="t0,t1", help="comma-separated teacher names")
    ap.add_argument("--k", type=int, default=10, help="top-K width (fuse.k)")
    ap.add_argument("--vocab", type=int, default=151936,
                    help="student vocabulary (model.vocab_size); teacher ids fall in [0, vocab)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--overflow", choices=["truncate", "reject"], default="truncate",
                    help="as the run's data.overflow (it enters the dataset hash)")
    ap.add_argument("--logprobs", action="store_true",
                    help="format-4 shards with synthetic teacher log-probs (fuse.loss=hybrid)")
    ap.add_argument("--hf-teacher", default=None,
                    help="also save a random-weight HF Llama for the pivot tokenizer here")
    args = ap.parse_args(argv)
    try:
        m = make_synthetic_fuse_data(args.out, seq_len=args.seq_len, samples=args.samples,
                                     teachers=[t.strip() for t in args.teachers.split(",") if t.strip()],
                                     k=args.k, vocab=args.vocab, seed=args.seed,
                                     samples_per_shard=args.samples_per_shard,
                                     overflow=args.overflow, hf_teacher=args.hf_teacher,
                                     logprobs=args.logprobs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in m.items() if k != "overrides"}, indent=1))
    print("overrides: " + " ".join(f"'{o}'" for o in m["overrides"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
