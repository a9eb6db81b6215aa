"""Offline teachers: a teacher source of the fuse stage that reads precomputed top-K shards."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_fusion.config import ConfigError
from megatron_fusion.errors import TeacherDataError


class OfflineTeacher:
    """A teacher whose top-K was precomputed (tools/precompute_teacher_topk.py)."""

    def __init__(self, name: str, topk_dir: str, expected: dict):
        from megatron_fusion.teachers.shards import TopKReader, TopKStoreError

        if not topk_dir:
            raise ConfigError(f"teacher {name}.topk_dir", "must be set for an offline teacher")
        if not Path(topk_dir).is_dir():
            raise TeacherDataError(f"teacher {name}: top-K directory not found: {topk_dir}")
        try:
            self.reader = TopKReader(topk_dir, expected=expected)
        except TopKStoreError as e:
            raise TeacherDataError(f"teacher {name}: {e}") from None
        self.name = name

    def check_covers(self, sample_ids) -> None:
        missing = [i for i in sample_ids if i not in self.reader]
        if missing:
            raise TeacherDataError(
                f"teacher {self.name}: {len(missing)} training samples have no top-K in "
                f"{self.reader.paths[0].parent} (first: sample id {missing[0]}); re-run the precompute")

    def fetch(self, sample_ids: torch.Tensor, seq_len: int):
        """-> values [b,s,K] f32, ids [b,s,K] i64, aligned [b,s] bool, teacher_ce [b] or None."""
        values, ids, aligned = self.reader.batch(sample_ids.tolist(), seq_len)
        ce = self.reader.teacher_ce(sample_ids.tolist()) if hasattr(self.reader, "teacher_ce") else None
        return values, ids, aligned, ce
