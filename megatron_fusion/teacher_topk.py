"""Offline teacher top-K: run one teacher over the pivot's SFT data, align, write shards (SPEC §6).

For every pivot sample the teacher encodes the *same text segments* with its own tokenizer
(``megatron_fusion.data.sft.encode_segments``), runs a forward pass, takes the standardised top-K
of its logits with the student's own ``standardized_topk`` (distributed over the teacher's vocab
shards when its backend is tensor-parallel), and the rows of the aligned teacher positions are
placed at the pivot positions (``megatron_fusion.align``). Only pivot positions whose label is a
response token are kept (``aligned_mask`` = aligned AND response). The same forward pass gives
each sample's teacher cross-entropy on the gold response over the teacher's *own* tokens
(``token_logprobs``, vocab-parallel): position j predicting token j+1 counts when token j+1 is a
response token of the teacher's encoding; stored per sample for the minCE / avgCE weights.

Backends implement ``TeacherBackend``: ``local_logits(input_ids [b, s]) -> [b, s, v_local]`` (this
rank's vocab shard, padding columns allowed past ``vocab_size``), ``vocab_size`` (true vocab),
``tp_group`` (None for a single shard). ``HFTeacherBackend`` (transformers, local dir or GGUF) is
here; ``VocabShardedBackend`` splits a full-vocab backend Megatron-style across a TP group (tests,
and teachers whose logits are small enough to compute whole on each rank).

Shards: ``{out_dir}/{teacher}-{index:05d}.topk`` each covering ``samples_per_shard`` consecutive
dataset items. A finished shard (valid file with the expected header) is skipped on restart, so a
killed run continues where it stopped and produces byte-identical files (nothing time- or
order-dependent goes into a shard). In a TP group every rank computes, TP rank 0 writes.
CLI: ``tools/precompute_teacher_topk.py``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from megatron_fusion.align import (aligned_fraction, mined_alignment, offset_alignment,
                                   report_alignment)
from megatron_fusion.data.sft import SFTDataset, encode_segments
from megatron_fusion.topk_store import TopKHeader, TopKStoreError, TopKWriter, read_topk_header

log = logging.getLogger(__name__)


class TeacherBackend(Protocol):
    vocab_size: int            # true vocabulary size (columns >= it are padding)
    tp_group: object           # torch.distributed group over the vocab shards, or None

    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] int64 -> logits [b, s, v_local] (this rank's vocab shard)."""
        ...


class HFTeacherBackend:
    """A transformers causal LM (local directory, or a GGUF file in it), float32, eval, no grad."""

    def __init__(self, model_dir: str | Path | None = None, *, gguf_file: str | None = None,
                 model=None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        if model is None:
            from transformers import AutoModelForCausalLM

            kw = {"gguf_file": gguf_file} if gguf_file else {}
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kw)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.vocab_size = int(self.model.config.vocab_size)
        self.tp_group = None

    @torch.no_grad()
    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), use_cache=False)
        return out.logits.float()                                   # [b, s, v]


class VocabShardedBackend:
    """This TP rank's Megatron-style vocab shard of a full-vocab backend's logits.

    The vocab is padded to a multiple of ``tp * pad_multiple``; rank r holds columns
    ``[r * v_local, (r + 1) * v_local)``; padding columns hold 0 (never selected: ``vocab_size``).
    """

    def __init__(self, full: TeacherBackend, tp_group, pad_multiple: int = 1):
        import torch.distributed as dist

        self.full, self.tp_group = full, tp_group
        self.vocab_size = full.vocab_size
        tp = dist.get_world_size(tp_group)
        self.rank = dist.get_rank(tp_group)
        m = tp * pad_multiple
        self.v_local = -(-self.vocab_size // m) * m // tp

    @torch.no_grad()
    def local_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        z = self.full.local_logits(input_ids)                      # [b, s, v]
        a = self.rank * self.v_local
        out = z.new_zeros(*z.shape[:-1], self.v_local)             # [b, s, v/tp]
        n = max(0, min(self.v_local, self.vocab_size - a))
        out[..., :n] = z[..., a:a + n]
        return out


@dataclass
class SampleTopK:
    """One sample's teacher top-K at pivot positions."""

    sample_id: int
    values: torch.Tensor        # [P, K] float32 (standardised logits), 0 where not aligned
    ids: torch.Tensor           # [P, K] int64 teacher ids
    aligned_mask: torch.Tensor  # [P] bool: aligned AND labels[t] is a response token
    n_response: int             # response positions (loss_mask = 1) among the P
    teacher_tokens: int
    teacher_ce: float = float("nan")  # mean NLL (nats/token) over the teacher's response tokens
    teacher_ce_tokens: int = 0        # teacher tokens (predicted, response) the mean is over


def teacher_inputs(sample, teacher_tokenizer, pivot_positions: int,
                   max_teacher_len: int | None = None, *, with_response: bool = False):
    """Teacher ids/offsets for a pivot sample, cut where they stop mattering (causal model):
    after the last pivot position's context end, or at ``max_teacher_len``.
    ``with_response``: also return the teacher tokens' response flags (same cut)."""
    ids, offs, is_resp, _ = encode_segments(teacher_tokenizer, sample.segments)
    c_max = int(sample.offsets[pivot_positions - 1][1]) if pivot_positions else 0
    n = 0
    while n < len(ids) and offs[n][1] <= c_max:
        n += 1
    if max_teacher_len is not None:
        n = min(n, max_teacher_len)
    if with_response:
        return ids[:n], offs[:n], is_resp[:n]
    return ids[:n], offs[:n]


def align_sample(sample, t_ids, t_offs, pivot_tokenizer, teacher_tokenizer, pivot_positions: int,
                 method: str = "offset") -> list[int]:
    p_offs = sample.offsets[:pivot_positions].tolist()
    if method == "offset":
        return offset_alignment(p_offs, t_offs)
    if method == "mined":
        p_pieces = [pivot_tokenizer.id_to_piece(int(i)) for i in sample.ids[:pivot_positions]]
        return mined_alignment(p_pieces, [teacher_tokenizer.id_to_piece(int(i)) for i in t_ids])
    raise ValueError(f"alignment must be 'offset' or 'mined', got {method!r}")


def compute_batch_topk(samples, backend: TeacherBackend, teacher_tokenizer, pivot_tokenizer,
                       seq_len: int, *, k: int, eps: float, alignment: str,
                       max_teacher_len: int | None) -> list[SampleTopK]:
    """Teacher forward on a right-padded batch, standardised top-K placed at pivot positions, and
    each sample's teacher CE on its own response tokens (``SampleTopK.teacher_ce``)."""
    # the student's own functions (SPEC §2): top-K and vocab-parallel log-softmax
    from megatron_fusion.losses import standardized_topk, token_logprobs

    prepared = []
    for s in samples:
        P = min(len(s.ids), seq_len)                       # pivot positions (tokens) of the sample
        t_ids, t_offs, t_resp = teacher_inputs(s, teacher_tokenizer, P, max_teacher_len,
                                               with_response=True)
        align = align_sample(s, t_ids, t_offs, pivot_tokenizer, teacher_tokenizer, P, alignment)
        prepared.append((s, P, t_ids, t_resp, align))
    b, T = len(prepared), max(1, max(len(p[2]) for p in prepared))
    pad = teacher_tokenizer.pad_id if teacher_tokenizer.pad_id is not None else (
        teacher_tokenizer.eos_id or 0)
    batch = torch.full((b, T), pad, dtype=torch.long)               # [b, T], right padding
    ce_mask = torch.zeros(b, T, dtype=torch.bool)                   # position j predicts a response token
    for r, (_, _, t_ids, t_resp, _) in enumerate(prepared):
        batch[r, :len(t_ids)] = torch.as_tensor(t_ids, dtype=torch.long)
        ce_mask[r, :max(0, len(t_ids) - 1)] = torch.as_tensor(t_resp[1:], dtype=torch.bool)
    labels = torch.cat([batch[:, 1:], batch[:, -1:]], dim=1)        # [b, T]: token j+1 (last: unused)
    with torch.no_grad():
        logits = backend.local_logits(batch)                        # [b, T, v/tp]
        values, ids = standardized_topk(logits, k, eps=eps, vocab_size=backend.vocab_size,
                                        tp_group=backend.tp_group)  # [b, T, K] x2
        logp = token_logprobs(logits, labels.to(logits.device), vocab_size=backend.vocab_size,
                              tp_group=backend.tp_group)            # [b, T], same on all TP ranks
    nll_sum = torch.where(ce_mask, -logp.double().cpu(), 0.0).sum(-1)   # [b]
    n_ce = ce_mask.sum(-1)                                          # [b]
    out = []
    for r, (s, P, t_ids, _, align) in enumerate(prepared):
        a = torch.as_tensor(align, dtype=torch.long)               # [P] teacher pos or -1
        resp = torch.zeros(P, dtype=torch.bool)                     # labels[t] is a response token
        nxt = torch.as_tensor(s.is_response[1:P + 1], dtype=torch.bool)
        resp[: len(nxt)] = nxt
        mask = (a >= 0) & resp
        v = torch.zeros(P, k, dtype=torch.float32)
        i = torch.zeros(P, k, dtype=torch.long)
        v[mask] = values[r, a[mask]].float()
        i[mask] = ids[r, a[mask]].long()
        n = int(n_ce[r])
        ce = float(nll_sum[r]) / n if n else float("nan")
        out.append(SampleTopK(s.sample_id, v, i, mask, int(resp.sum()), len(t_ids), ce, n))
    return out


def shard_path(out_dir: str | Path, teacher: str, index: int) -> Path:
    return Path(out_dir) / f"{teacher}-{index:05d}.topk"


def precompute_teacher_topk(dataset: SFTDataset, teacher_tokenizer, backend: TeacherBackend,
                            out_dir: str | Path, *, teacher: str, k: int = 10,
                            alignment: str = "offset", eps: float = 1e-6,
                            dtype: str = "bfloat16", samples_per_shard: int = 256,
                            batch_size: int = 4, max_teacher_len: int | None = None,
                            threshold: float = 0.8, write: bool = True,
                            progress: bool = True) -> dict:
    """Write (or complete) the teacher's top-K shards for ``dataset``; return a summary dict.

    ``write``: whether this rank writes files (TP rank 0); all ranks of a TP group must call it.
    """
    out_dir = Path(out_dir)
    n = len(dataset)
    n_shards = -(-n // samples_per_shard)
    expected = {"teacher": teacher, "teacher_tokenizer_hash": teacher_tokenizer.content_hash,
                "pivot_tokenizer_hash": dataset.tokenizer.content_hash, "k": k,
                "dataset_hash": dataset.dataset_hash, "dtype": dtype}
    meta = {"alignment": alignment, "eps": eps, "seq_len": dataset.seq_len,
            "max_teacher_len": max_teacher_len}
    aligned = response = tokens = skipped = 0
    bar = None
    if progress and write:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"teacher {teacher}", unit="sample", dynamic_ncols=True)
    t0 = time.perf_counter()
    for si in range(n_shards):
        lo, hi = si * samples_per_shard, min(n, (si + 1) * samples_per_shard)
        path = shard_path(out_dir, teacher, si)
        done = _finished(path, expected, dataset.sample(lo).sample_id,
                         dataset.sample(hi - 1).sample_id + 1, meta)
        if done is not None:  # every rank sees the same file system, so all ranks skip it
            aligned += done["meta"]["aligned_positions"]
            response += done["meta"]["response_positions"]
            skipped += 1
            if bar:
                bar.update(hi - lo)
            continue
        writer = TopKWriter(path, TopKHeader(**{k_: v for k_, v in expected.items()},
                                             meta=dict(meta)))
        sh_aligned = sh_resp = 0
        for b0 in range(lo, hi, batch_size):
            samples = [dataset.sample(i) for i in range(b0, min(hi, b0 + batch_size))]
            for r in compute_batch_topk(samples, backend, teacher_tokenizer, dataset.tokenizer,
                                        dataset.seq_len, k=k, eps=eps, alignment=alignment,
                                        max_teacher_len=max_teacher_len):
                writer.add(r.sample_id, r.values, r.ids, r.aligned_mask, r.teacher_ce,
                           r.teacher_ce_tokens)
                sh_aligned += int(r.aligned_mask.sum())
                sh_resp += r.n_response
                tokens += r.teacher_tokens
            if bar:
                bar.update(len(samples))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}",
                                aligned=f"{(aligned + sh_aligned) / max(response + sh_resp, 1):.3f}")
        writer.header.meta.update(aligned_positions=sh_aligned, response_positions=sh_resp)
        if write:
            writer.close()
        else:
            writer.abort()
        aligned += sh_aligned
        response += sh_resp
    if bar:
        bar.close()
    fraction = aligned / response if response else 1.0
    if write:
        report_alignment(teacher, fraction, threshold)
    elapsed = time.perf_counter() - t0
    return {"teacher": teacher, "shards": n_shards, "skipped_shards": skipped,
            "aligned_fraction": fraction, "aligned_positions": aligned,
            "response_positions": response, "teacher_tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "paths": [str(shard_path(out_dir, teacher, i)) for i in range(n_shards)]}


def _finished(path: Path, expected: dict, first_id: int, end_id: int, meta: dict) -> dict | None:
    """The header of a finished shard for exactly this work, None when it must be (re)made."""
    if not path.exists():
        return None
    try:
        header = read_topk_header(path)
    except TopKStoreError as e:  # cannot come from our atomic writes; recompute, but say so
        warnings.warn(f"recomputing unusable shard: {e}")
        return None
    # a shard from another run (other teacher, data, K...) is a configuration error, not resume
    want = dict(expected, sample_id_start=first_id, sample_id_end=end_id)
    read_topk_header(path, want, verify=False)
    for key, v in meta.items():
        if header["meta"].get(key) != v:
            raise TopKStoreError(f"{path}: header field 'meta.{key}' is "
                                 f"{header['meta'].get(key)!r}, the run expects {v!r}")
    return header


def expected_header(dataset: SFTDataset, teacher: str, teacher_tokenizer, k: int = 10,
                    dtype: str = "bfloat16") -> dict:
    """The header fields a trainer should pass to ``TopKReader(expected=...)``."""
    return {"teacher": teacher, "teacher_tokenizer_hash": teacher_tokenizer.content_hash,
            "pivot_tokenizer_hash": dataset.tokenizer.content_hash, "k": k,
            "dataset_hash": dataset.dataset_hash, "dtype": dtype}


__all__ = ["TeacherBackend", "HFTeacherBackend", "VocabShardedBackend", "precompute_teacher_topk",
           "compute_batch_topk", "expected_header", "shard_path", "aligned_fraction"]


def cli_main(argv=None) -> dict:
    """``tools/precompute_teacher_topk.py``: one teacher over one SFT file (see --help)."""
    import argparse
    import json

    from megatron_fusion.tokenizers import load_tokenizer

    ap = argparse.ArgumentParser(description="Precompute a teacher's standardised top-K at the "
                                 "pivot's response positions (SPEC §6 shards).")
    ap.add_argument("--data", required=True, help="SFT JSONL (prompt/response or messages)")
    ap.add_argument("--pivot-tokenizer", required=True, help="pivot tokenizer (.model, dir, .gguf)")
    ap.add_argument("--teacher-model", required=True, help="HF model directory (or the GGUF's)")
    ap.add_argument("--gguf-file", default=None, help="GGUF file name inside --teacher-model")
    ap.add_argument("--teacher-tokenizer", default=None,
                    help="teacher tokenizer (default: the model directory / its GGUF)")
    ap.add_argument("--teacher-name", required=True, help="teacher name as in the fusion config")
    ap.add_argument("--out", required=True, help="output directory for the shards")
    ap.add_argument("--seq-len", type=int, required=True, help="pivot sequence length")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--alignment", choices=["offset", "mined"], default="offset")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--samples-per-shard", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-teacher-len", type=int, default=None)
    ap.add_argument("--overflow", choices=["truncate", "reject", "error"], default="truncate")
    ap.add_argument("--empty", choices=["skip", "reject"], default="skip")
    ap.add_argument("--cache-dir", default=None, help="tokenised-data cache directory")
    ap.add_argument("--threshold", type=float, default=0.8, help="warn under this aligned fraction")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from pathlib import Path as _P

    model_dir = _P(args.teacher_model)
    tok_spec = args.teacher_tokenizer or (model_dir / args.gguf_file if args.gguf_file else model_dir)
    teacher_tok = load_tokenizer(tok_spec, name=args.teacher_name)
    ds = SFTDataset(args.data, load_tokenizer(args.pivot_tokenizer), args.seq_len,
                    cache_dir=args.cache_dir, overflow=args.overflow, empty=args.empty)
    backend = HFTeacherBackend(model_dir, gguf_file=args.gguf_file)
    summary = precompute_teacher_topk(
        ds, teacher_tok, backend, args.out, teacher=args.teacher_name, k=args.k,
        alignment=args.alignment, eps=args.eps, dtype=args.dtype,
        samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
        max_teacher_len=args.max_teacher_len, threshold=args.threshold,
        progress=not args.no_progress)
    summary["dataset_stats"] = ds.stats.as_dict()
    print(json.dumps({k: v for k, v in summary.items() if k != "paths"}, indent=1))
    return summary
