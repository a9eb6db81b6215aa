"""Offline teacher top-K: run one teacher over the pivot's SFT data, align, write shards (methods.md §6).

Shards: ``{out_dir}/{teacher}-{index:05d}.topk`` each covering ``samples_per_shard`` consecutive
dataset items. A finished shard (valid file with the expected header) is skipped on restart, so a
killed run continues where it stopped and produces byte-identical files (nothing time- or
order-dependent goes into a shard). In a TP group every rank computes, TP rank 0 writes.
Command: ``megatron-fusion precompute-topk`` (``--backend megatron --checkpoint RUN_DIR`` under
``torchrun --nproc-per-node TP`` for a megatron-fusion teacher).

Matched mass (docs/methods.md §9): with the teacher -> pivot vocabulary match (built from the two
tokenizers, or the checked cache ``match_cache``), each shard's header meta records the teacher's
top-K probability mass over its aligned positions (``topk_mass``, the sum of ``p_t`` over the K
entries and positions) and the part of it on tokens that have a pivot match
(``matched_topk_mass``); the summary's ``matched_mass_fraction`` is their ratio over all shards.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from megatron_fusion.data.sft import SFTDataset
from megatron_fusion.teachers.align import report_alignment
from megatron_fusion.teachers.backends import TeacherBackend
from megatron_fusion.teachers.shards import (LOGP_DTYPE, TopKHeader, TopKStoreError, TopKWriter,
                                             read_topk_header, remove_stale_temps)
from megatron_fusion.teachers.topk import compute_batch_topk



def shard_path(out_dir: str | Path, teacher: str, index: int) -> Path:
    return Path(out_dir) / f"{teacher}-{index:05d}.topk"


def precompute_teacher_topk(dataset: SFTDataset, teacher_tokenizer, backend: TeacherBackend,
                            out_dir: str | Path, *, teacher: str, k: int = 10,
                            alignment: str = "offset", eps: float = 1e-6,
                            dtype: str = LOGP_DTYPE, samples_per_shard: int = 256,
                            batch_size: int = 4, max_teacher_len: int | None = None,
                            threshold: float = 0.8, write: bool = True,
                            progress: bool = True, match_cache: str | Path | None = None) -> dict:
    """Write (or complete) the teacher's top-K shards for ``dataset``; return a summary dict.

    ``write``: whether this rank writes files (TP rank 0); all ranks of a TP group must call it.
    ``match_cache``: the vocabulary-match cache file to use (made if missing, checked against both
    tokenizers if present); None builds the match in memory.
    """
    out_dir = Path(out_dir)
    match = _vocab_match(teacher_tokenizer, dataset.tokenizer, match_cache, write)
    dense = match.dense() if match is not None else None
    mass = [0.0, 0.0]                    # [matched top-K mass, top-K mass] over all shards
    mass_complete = match is not None    # every shard's mass known (resumed ones: their header)
    if write:  # a writer killed mid-shard left its temp file: the shard is recomputed below
        remove_stale_temps(out_dir)
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
            if "topk_mass" in done["meta"]:
                mass[0] += done["meta"]["matched_topk_mass"]
                mass[1] += done["meta"]["topk_mass"]
            else:   # a shard written without it: no fraction for the whole run
                mass_complete = False
            skipped += 1
            if bar:
                bar.update(hi - lo)
            continue
        writer = TopKWriter(path, TopKHeader(**{k_: v for k_, v in expected.items()},
                                             meta=dict(meta)))
        sh_aligned = sh_resp = 0
        sh_mass = [0.0, 0.0]
        for b0 in range(lo, hi, batch_size):
            samples = [dataset.sample(i) for i in range(b0, min(hi, b0 + batch_size))]
            for r in compute_batch_topk(samples, backend, teacher_tokenizer, dataset.tokenizer,
                                        dataset.seq_len, k=k, eps=eps, alignment=alignment,
                                        max_teacher_len=max_teacher_len):
                writer.add(r.sample_id, r.values, r.ids, r.aligned_mask, r.teacher_ce,
                           r.teacher_ce_tokens, r.teacher_ce_byte, r.teacher_ce_bytes,
                           logprobs=(r.logp, r.d, r.c) if dtype == LOGP_DTYPE else None)
                sh_aligned += int(r.aligned_mask.sum())
                sh_resp += r.n_response
                tokens += r.teacher_tokens
                if dense is not None:
                    p = torch.where(r.aligned_mask[:, None], r.logp.double().exp(), 0.0)
                    sh_mass[0] += float(torch.where(dense[r.ids] >= 0, p, 0.0).sum())
                    sh_mass[1] += float(p.sum())
            if bar:
                bar.update(len(samples))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}",
                                aligned=f"{(aligned + sh_aligned) / max(response + sh_resp, 1):.3f}")
        writer.header.meta.update(aligned_positions=sh_aligned, response_positions=sh_resp)
        if match is not None:
            writer.header.meta.update(matched_topk_mass=sh_mass[0], topk_mass=sh_mass[1])
            mass = [mass[0] + sh_mass[0], mass[1] + sh_mass[1]]
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
    matched = mass[0] / mass[1] if mass_complete and mass[1] > 0 else None
    return {"teacher": teacher, "shards": n_shards, "skipped_shards": skipped,
            "aligned_fraction": fraction, "aligned_positions": aligned,
            "matched_mass_fraction": matched,
            "vocab_matched": match.n_matched if match is not None else None,
            "vocab_matched_fraction": match.matched_fraction if match is not None else None,
            "response_positions": response, "teacher_tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "paths": [str(shard_path(out_dir, teacher, i)) for i in range(n_shards)]}


def _vocab_match(teacher_tokenizer, pivot_tokenizer, cache, write: bool):
    """The teacher -> pivot match (None when a tokenizer cannot list its pieces); ``cache``: read
    (checked against both tokenizers) or made by the writing rank, built in memory elsewhere."""
    from megatron_fusion.teachers.vocab_match import VocabMatch

    if not (hasattr(teacher_tokenizer, "vocab_pieces") and hasattr(pivot_tokenizer, "vocab_pieces")):
        return None
    if cache is not None and (write or Path(cache).exists()):
        return VocabMatch.load_or_build(cache, teacher_tokenizer, pivot_tokenizer)
    return VocabMatch.build(teacher_tokenizer, pivot_tokenizer)


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
    want.pop("dtype")
    read_topk_header(path, want, verify=False)
    for key, v in meta.items():
        if header["meta"].get(key) != v:
            raise TopKStoreError(f"{path}: header field 'meta.{key}' is "
                                 f"{header['meta'].get(key)!r}, the run expects {v!r}")
    if header["dtype"] != expected["dtype"]:   # the same work in the other format: rewrite it
        warnings.warn(f"recomputing {path}: it stores dtype {header['dtype']!r}, this run "
                      f"writes {expected['dtype']!r}")
        return None
    return header


def expected_header(dataset: SFTDataset, teacher: str, teacher_tokenizer, k: int = 10,
                    dtype: str = LOGP_DTYPE) -> dict:
    """The header fields a trainer should pass to ``TopKReader(expected=...)``."""
    return {"teacher": teacher, "teacher_tokenizer_hash": teacher_tokenizer.content_hash,
            "pivot_tokenizer_hash": dataset.tokenizer.content_hash, "k": k,
            "dataset_hash": dataset.dataset_hash, "dtype": dtype}
