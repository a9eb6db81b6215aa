"""The student side of online teachers: ``OnlineTeacher``, a teacher source of the fuse stage."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from megatron_fusion.config import Config
from megatron_fusion.errors import TeacherDataError
from megatron_fusion.parallel import TeacherGroupSpec, WorldSplit
from megatron_fusion.teachers.online.protocol import (ERROR, HEADER, OK, TeacherFailedError,
                                                      batch_fingerprint, decode_topk, error_key,
                                                      int_to_fingerprint)


class OnlineTeacher:
    """A teacher source for ``FuseStage`` that receives top-K from the teacher group (module doc).

    ``fetch`` must be called for the micro-batches of this DP rank in training order; it blocks
    at most ``timeout_s`` per message. ``pop_metrics`` returns and resets the time spent blocked
    and the teacher's tokens / compute seconds since the last call; with ``pp_group`` (student
    PP > 1) every stage calls it and gets the last stage's numbers (only that stage fetches, and
    the metrics sink is on launch rank 0, a first-stage rank).

    Devices: the bridge is gloo, so ``fetch`` receives into host tensors and returns them on
    the host; ``FuseStage.prepare_step`` moves them to the student's device once. The PP
    all-reduce of ``pop_metrics`` runs on ``device`` (the student's NCCL groups).
    """

    def __init__(self, name: str, index: int, split: WorldSplit, spec: TeacherGroupSpec,
                 dp_rank: int, timeout_s: float, pp_group=None, device=None):
        self.name, self.tag, self.bridge, self.store = name, index, split.bridge, split.store
        self.pp_group = pp_group
        self.device = torch.device("cpu") if device is None else device  # pp_group's buffers
        self.src = spec.first + (dp_rank % spec.replicas) * spec.tp   # TP rank 0 of the replica
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.wait_s = self.tokens = self.compute_s = 0.0

    def _posted_error(self) -> str | None:
        try:
            key = error_key(self.name)
            return self.store.get(key).decode(errors="replace") if self.store.check([key]) else None
        except Exception:  # the store went away with the launch: no message to add
            return None

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        try:
            self.bridge.recv([t], self.src, self.tag).wait(self.timeout)
        except RuntimeError as e:
            kept = "the last checkpoint is kept"
            posted = self._posted_error()
            if posted is not None:
                raise TeacherFailedError(f"teacher {self.name} failed: {posted}; {kept}") from None
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise TeacherFailedError(
                    f"teacher {self.name}: no top-K from its launch rank {self.src} within "
                    f"fuse.timeout_s={self.timeout_s:g}s (teacher hung or dead); {kept}") from None
            raise TeacherFailedError(f"teacher {self.name}: lost its launch rank {self.src} "
                                     f"({str(e).splitlines()[0][:200]}); {kept}") from None
        return t

    def fetch(self, sample_ids: torch.Tensor, seq_len: int):
        """-> values [b,s,K] f32, ids [b,s,K] i64, aligned [b,s] bool, teacher_ce [b] f32,
        logp [b,s,K] f32: as ``OfflineTeacher.fetch`` from format-4 shards of the same teacher."""
        t0 = time.perf_counter()
        h = self._recv(torch.zeros(HEADER, dtype=torch.long)).tolist()
        if h[0] == ERROR:
            msg = bytes(self._recv(torch.zeros(h[4], dtype=torch.uint8)).tolist()).decode(
                errors="replace")
            raise TeacherFailedError(f"teacher {self.name} failed: {msg}; the last checkpoint "
                                     "is kept")
        if h[0] != OK:
            raise TeacherFailedError(f"teacher {self.name}: malformed message header {h}")
        b, s, k = h[1:4]
        codes = self._recv(torch.empty(b, s, k, dtype=torch.int16))
        ids = self._recv(torch.empty(b, s, k, dtype=torch.int32))
        aligned = self._recv(torch.empty(b, s, dtype=torch.uint8))
        ce = self._recv(torch.empty(b, dtype=torch.float32))
        dc = self._recv(torch.empty(b, s, 2, dtype=torch.float32))
        self.wait_s += time.perf_counter() - t0
        self.tokens += h[6]
        self.compute_s += h[7] / 1e6
        want = batch_fingerprint(sample_ids)
        if int_to_fingerprint(h[5]) != want:
            raise TeacherDataError(
                f"teacher {self.name}: top-K for batch {int_to_fingerprint(h[5])} arrived for the "
                f"student's batch {want} (fingerprint mismatch: the teacher reads another sample "
                "order; same data.train, train.seed, train.global_batch and run.dir?)")
        values, ids, aligned, logp = decode_topk(codes, ids, aligned, dc)
        return values, ids, aligned, ce, logp

    def pop_metrics(self) -> dict:
        got = [self.wait_s, self.tokens, self.compute_s]
        if self.pp_group is not None:  # other stages hold zeros: the sum is the last stage's
            vec = torch.tensor(got, dtype=torch.float64).to(self.device)   # host counters
            dist.all_reduce(vec, group=self.pp_group)
            got = vec.cpu().tolist()       # once per step, with the step's metrics
        wait_s, tokens, compute_s = got
        self.wait_s = self.tokens = self.compute_s = 0.0
        return {"wait_s": wait_s, "tokens_per_s": tokens / compute_s if compute_s > 0 else 0.0}


def online_sources(cfg: Config, groups) -> dict[str, OnlineTeacher]:
    """``OnlineTeacher`` per online teacher of ``cfg`` for this student rank."""
    from megatron_fusion.parallel import world_split

    split = world_split()
    online = [t for t in cfg.fuse.teachers if t.source == "online"]
    if online and split is None:
        raise TeacherFailedError(f"teacher {online[0].name}: online teachers need the launch "
                                 "split into student and teacher ranks (megatron_fusion.train / "
                                 "megatron-fusion train start it)")
    out = {}
    for t in online:
        i = [s.name for s in split.teachers].index(t.name)
        out[t.name] = OnlineTeacher(t.name, i, split, split.teachers[i], groups.dp_rank,
                                    cfg.fuse.timeout_s,
                                    pp_group=groups.pp if groups.pp_size > 1 else None,
                                    device=groups.device)
    return out
