"""Offline teachers: a teacher source of the fuse stage that reads precomputed top-K shards."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from megatron_fusion.config import ConfigError
from megatron_fusion.errors import TeacherDataError


class OfflineTeacher:
    """A teacher whose top-K was precomputed (``megatron-fusion precompute-topk``).

    ``expected``: header fields the shards must carry (``TopKReader``; ``"meta.X"`` = a field of
    the header's meta). ``strict`` (the fuse stage): ``teacher_tokenizer_hash`` must be among
    them, else a ``ConfigError`` names the missing ``tokenizer``. Synthetic shards
    (tools/make_synthetic_topk.py: random values, made by no tokenizer, eps or alignment) are
    the exception: those checks do not apply to them, and a warning says so.
    ``require_logprobs`` (``fuse.loss: hybrid``): shards without the teacher's log-probs (format
    3) are refused before step 1, one line naming the file (``TeacherDataError``).
    """

    def __init__(self, name: str, topk_dir: str, expected: dict, *, strict: bool = False,
                 require_logprobs: bool = False):
        from megatron_fusion.teachers.shards import TopKReader, TopKStoreError, read_topk_header

        if not topk_dir:
            raise ConfigError(f"teacher {name}.topk_dir", "must be set for an offline teacher")
        if not Path(topk_dir).is_dir():
            raise TeacherDataError(f"teacher {name}: top-K directory not found: {topk_dir}")
        expected = dict(expected)
        try:
            first = sorted(Path(topk_dir).glob("*.topk"))
            head = read_topk_header(first[0], verify=False) if first else {}
            if (head.get("meta") or {}).get("synthetic"):
                dropped = [k for k in expected if k.startswith("meta.")
                           or k == "teacher_tokenizer_hash"]
                for k in dropped:
                    expected.pop(k)
                warnings.warn(f"teacher {name}: synthetic top-K shards in {topk_dir}: teacher "
                              "tokenizer hash, eps and alignment are not checked", stacklevel=2)
            elif strict and "teacher_tokenizer_hash" not in expected:
                h = head.get("teacher_tokenizer_hash", "?")
                raise ConfigError(f"teacher {name}.tokenizer",
                                  f"must be set: the shards in {topk_dir} record teacher "
                                  f"tokenizer hash {h}, checked against it before step 1")
            self.reader = TopKReader(topk_dir, expected=expected,
                                     require_logprobs=require_logprobs)
        except TopKStoreError as e:
            raise TeacherDataError(f"teacher {name}: {e}") from None
        self.name = name
        self.topk_dir = topk_dir

    def check_alignment(self, warn_below: float, stop_below: float) -> float | None:
        """Warn / stop on the aligned fraction the shards' headers record (before step 1)."""
        from megatron_fusion.teachers.topk import check_aligned_fraction

        aligned, response = self.reader.aligned_fraction()
        return check_aligned_fraction(self.name, aligned, response, warn_below, stop_below,
                                      f"recorded by its shards in {self.topk_dir}")

    def check_covers(self, sample_ids) -> None:
        missing = [i for i in sample_ids if i not in self.reader]
        if missing:
            from megatron_fusion.teachers.shards import TopKStoreError

            try:   # a flipped sample-id byte in an index is corruption, not a missing sample
                self.reader.verify_all()
            except TopKStoreError as e:
                raise TeacherDataError(f"teacher {self.name}: {e}") from None
            raise TeacherDataError(
                f"teacher {self.name}: {len(missing)} training samples have no top-K in "
                f"{self.reader.paths[0].parent} (first: sample id {missing[0]}); re-run the precompute")

    def fetch(self, sample_ids: torch.Tensor, seq_len: int):
        """-> values [b,s,K] f32, ids [b,s,K] i64, aligned [b,s] bool, teacher CE [b] f32 (nats
        per byte of response text: what minCE / avgCE compare, as the online wire's), logp
        [b,s,K] f32: the teacher's log-probs at the top-K ids over its full vocabulary (0 where
        not aligned; None when the shards are format 3). Host tensors; the same values as
        ``OnlineTeacher.fetch`` for the same teacher and data."""
        from megatron_fusion.teachers.shards import TopKStoreError

        try:   # a shard's checksum is verified on its first read: a corrupt one fails here
            values, ids, aligned, logp = self.reader.batch(sample_ids.tolist(), seq_len,
                                                           logprobs=True)
            return values, ids, aligned, self.reader.teacher_ce_byte(sample_ids.tolist()), logp
        except TopKStoreError as e:
            raise TeacherDataError(f"teacher {self.name}: {e}") from None
