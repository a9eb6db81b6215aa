"""Offline source log-probs for FPO (methods.md §5): each source scores prompt+chosen and prompt+rejected
with its OWN tokenizer; per pair we store the summed log-prob and the token count of each response.

The source encodes the preference file exactly like the pivot does (``PreferenceDataset``: BOS,
prompt, response, EOS; the EOS counts as a response token), runs ``backend.local_logits`` (same
``TeacherBackend`` interface as the teacher top-K tool, TP-sharded vocab allowed) and sums
``sequence_logprobs`` (the trainer's vocab-parallel log-softmax) over the response labels.
Shards ``{out_dir}/{source}-{index:05d}.logp`` are written atomically by TP rank 0, skipped when
already finished. ``dataset_hash`` in the header is the sha256 of the preference file.
Command: ``megatron-fusion precompute-logprobs``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from megatron_fusion.data.preference import PreferenceDataset
from megatron_fusion.teachers.topk import to_host
from megatron_fusion.teachers.backends import true_vocab_size
from megatron_fusion.teachers.shards import (LOGPROB_MAGIC, LogprobHeader, SourceLogprobStore,
                                        TopKStoreError, check_expected, read_container,
                                        remove_stale_temps)


def score_batch(items: list[dict], backend, pad_id: int,
                vocab_size: int | None = None) -> list[tuple]:
    """items: PreferenceDataset items -> (sample_id, chosen_sum, chosen_n, rejected_sum, rejected_n).

    ``vocab_size``: the source's true vocabulary (its tokenizer's size, ``true_vocab_size``; None =
    ``backend.vocab_size``). The forward and the log-prob sums run on the logits' device; both
    sides come back to the host in ONE copy.
    """
    from megatron_fusion.losses import sequence_logprobs

    vocab = backend.vocab_size if vocab_size is None else vocab_size
    sums = []
    for side in ("chosen", "rejected"):
        tokens = torch.stack([it[f"{side}_tokens"] for it in items])        # [b, s] host
        labels = torch.stack([it[f"{side}_labels"] for it in items])        # [b, s]
        mask = torch.stack([it[f"{side}_loss_mask"] for it in items])       # [b, s]
        used = int(((tokens != pad_id) | (mask > 0)).any(0).nonzero().max()) + 1
        tokens, labels, mask = tokens[:, :used], labels[:, :used], mask[:, :used]
        with torch.no_grad():
            logits = backend.local_logits(tokens)                            # [b, s, v/tp]
            dev = logits.device
            lp, n = sequence_logprobs(logits, labels.to(dev, non_blocking=True),
                                      mask.to(dev, non_blocking=True), vocab_size=vocab,
                                      tp_group=backend.tp_group)             # [b], [b]
        sums += [lp.double(), n]
    c_lp, c_n, r_lp, r_n = (t.tolist() for t in to_host(*sums))         # one copy
    return [(it["sample_id"], c_lp[r], c_n[r], r_lp[r], r_n[r]) for r, it in enumerate(items)]


def shard_path(out_dir, source: str, index: int) -> Path:
    return Path(out_dir) / f"{source}-{index:05d}.logp"


def precompute_source_logprobs(dataset: PreferenceDataset, backend, out_dir, *, source: str,
                               samples_per_shard: int = 1024, batch_size: int = 4,
                               write: bool = True, progress: bool = True) -> dict:
    """Score every pair of ``dataset`` (encoded with the source's tokenizer); write shards."""
    out_dir = Path(out_dir)
    if write:  # temp files of a writer killed mid-shard
        remove_stale_temps(out_dir)
    n = len(dataset)
    n_shards = -(-n // samples_per_shard)
    expected = {"source": source, "source_tokenizer_hash": dataset.tokenizer.content_hash,
                "dataset_hash": dataset.file_hash}
    bar = None
    if progress and write:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"source {source}", unit="pair", dynamic_ncols=True)
    t0, tokens, skipped = time.perf_counter(), 0, 0
    vocab = true_vocab_size(backend, dataset.tokenizer)
    for si in range(n_shards):
        lo, hi = si * samples_per_shard, min(n, (si + 1) * samples_per_shard)
        path = shard_path(out_dir, source, si)
        if path.exists():
            try:
                header, _ = read_container(path, LOGPROB_MAGIC)
            except TopKStoreError as e:
                warnings.warn(f"recomputing unusable shard: {e}")
            else:
                first, last = dataset.pair(lo)[0].sample_id, dataset.pair(hi - 1)[0].sample_id
                check_expected(path, header, dict(expected, sample_id_start=first,
                                                   sample_id_end=last + 1))
                skipped += 1
                if bar:
                    bar.update(hi - lo)
                continue
        records = []
        for b0 in range(lo, hi, batch_size):
            items = [dataset[i] for i in range(b0, min(hi, b0 + batch_size))]
            records += score_batch(items, backend, dataset.pad_id, vocab)
            tokens += sum(int((it["chosen_tokens"] != dataset.pad_id).sum()
                              + (it["rejected_tokens"] != dataset.pad_id).sum()) for it in items)
            if bar:
                bar.update(len(items))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        if write:
            SourceLogprobStore.write(path, LogprobHeader(
                **expected, meta={"seq_len": dataset.seq_len, "truncated": dataset.stats.truncated}),
                records)
    if bar:
        bar.close()
    elapsed = time.perf_counter() - t0
    return {"source": source, "shards": n_shards, "skipped_shards": skipped,
            "pairs": n, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "stats": dataset.stats.as_dict(),
            "paths": [str(shard_path(out_dir, source, i)) for i in range(n_shards)]}
