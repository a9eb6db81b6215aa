"""The teacher loop of an online teacher group (``run_teacher``): compute, align, send top-K."""


from __future__ import annotations

import datetime
import json
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_fusion.config import Config, TeacherConfig
from megatron_fusion.parallel import WorldSplit
from megatron_fusion.teachers.online.protocol import (error_key, error_message,
                                                      student_receivers, topk_message)




def start_position(cfg: Config) -> tuple[int, int]:
    """(step, consumed samples) the student starts from: its latest checkpoint on resume."""
    from megatron_fusion import checkpoint as ckpt

    latest = (ckpt.latest_checkpoint(Path(cfg.run.dir) / "checkpoints")
              if cfg.checkpoint.resume else None)
    if latest is None:
        return 0, 0
    meta = json.loads((latest / "meta.json").read_text())
    return int(meta["step"]), int(meta["consumed"])





def build_backend(tcfg: TeacherConfig, groups):
    """The frozen teacher under this group's TP; returns (backend, tokenizer spec).

    ``megatron``: the run at ``checkpoint`` rebuilt at the group's TP (vocab-sharded logits,
    resharded weights); tokenizer default: the run's ``data.tokenizer``. ``hf``: the transformers
    model directory at ``checkpoint`` (or a ``*.gguf`` file in one), loaded as the precompute tool
    loads it; tokenizer default: that directory (or GGUF). HF models are not tensor-parallel: at
    ``tp > 1`` each rank of a replica holds the *full* model and ``VocabShardedBackend`` keeps its
    vocab shard of the logits, so the distributed top-K over the shards runs as for a Megatron
    teacher (no memory saved; ``ranks = replicas`` with ``tp: 1`` is the better use of ranks).
    """
    from megatron_fusion.config import ConfigError

    if not tcfg.checkpoint:
        raise ConfigError(f"teacher {tcfg.name}.checkpoint", "must be set for an online teacher")
    if tcfg.backend == "hf":
        from megatron_fusion.parallel import rank_device
        from megatron_fusion.teachers.backends import VocabShardedBackend, open_backend

        path = Path(tcfg.checkpoint)
        if not path.exists():  # else transformers would take the path for a Hub repo id
            raise ConfigError(f"teacher {tcfg.name}.checkpoint",
                              f"HF model directory or GGUF file not found: {path}")
        gguf = path.name if path.suffix == ".gguf" else None
        # kind "hf" opens no process group: nothing is torn down when the block ends
        with open_backend("hf", model_dir=path.parent if gguf else path, gguf_file=gguf,
                          tokenizer=tcfg.tokenizer or None, device=rank_device(),
                          dtype=tcfg.dtype) as (full, tok_spec, _):
            pass
        backend = full if groups.tp_size == 1 else VocabShardedBackend(full, groups.tp)
        return backend, str(tok_spec)
    from megatron_fusion.teachers.backends import MegatronTeacherBackend

    backend = MegatronTeacherBackend(tcfg.checkpoint, tp_group=groups.tp)
    return backend, tcfg.tokenizer or backend.cfg.data.tokenizer


class AlignmentWatch:
    """The aligned fraction over the samples this teacher rank has computed, checked after every
    step against ``fuse.min_aligned_fraction`` (one warning, on TP rank 0 of the replica) and
    ``fuse.min_aligned_fraction_hard`` (``TeacherDataError`` naming the teacher: the run stops
    and the student gets the message)."""

    def __init__(self, name: str, warn_below: float, stop_below: float, warn: bool = True):
        self.name, self.warn_below, self.stop_below = name, warn_below, stop_below
        self.warned = not warn
        self.aligned = self.response = self.samples = 0

    def add(self, results) -> None:
        for r in results:
            self.aligned += int(r.aligned_mask.sum())
            self.response += r.n_response
            self.samples += 1

    def check(self) -> float | None:
        from megatron_fusion.teachers.topk import check_aligned_fraction

        frac = check_aligned_fraction(self.name, self.aligned, self.response,
                                      -1.0 if self.warned else self.warn_below, self.stop_below,
                                      f"over the {self.samples} samples it computed")
        if frac is not None and frac < self.warn_below:
            self.warned = True
        return frac


class _Sender:
    """TP rank 0 of a teacher replica: sends micro-batch messages, keeps ``prefetch`` in flight."""

    def __init__(self, bridge, tag: int, prefetch: int, name: str):
        self.bridge, self.tag, self.prefetch, self.name = bridge, tag, max(prefetch, 1), name
        self.pending: deque = deque()     # per micro-batch: [(work, tensor kept alive), ...]
        self.student_gone = False

    def send(self, dsts: list[int], tensors: list[torch.Tensor]) -> None:
        if self.student_gone:
            return
        try:
            works = [(self.bridge.send([t], d, self.tag), t) for d in dsts for t in tensors]
        except RuntimeError:  # the student closed its end (stopped or failed): stop sending
            self.student_gone = True
            return
        self.pending.append(works)
        while len(self.pending) > self.prefetch:
            self._wait(self.pending.popleft())

    def _wait(self, works, timeout: datetime.timedelta | None = None) -> None:
        try:
            for w, _ in works:
                w.wait(timeout) if timeout is not None else w.wait()
        except RuntimeError:  # the student closed its end: it stopped or failed, nothing to send
            self.student_gone = True

    def drain(self, timeout: datetime.timedelta | None = None) -> None:
        while self.pending and not self.student_gone:
            self._wait(self.pending.popleft(), timeout)
        self.pending.clear()


def run_teacher(cfg: Config, split: WorldSplit) -> dict:
    """The teacher loop on this teacher rank (module doc); returns a small summary."""
    from megatron_fusion.parallel import init_student_groups
    from megatron_fusion.teachers.topk import compute_batch_topk
    from megatron_fusion.tokenizers import load_tokenizer
    from megatron_fusion.data.order import SampleOrder, step_microbatch_indices
    from megatron_fusion.data.build import build_sft_dataset, build_tokenizer

    spec = split.teacher
    tag = list(split.teachers).index(spec)
    tcfg = next(t for t in cfg.fuse.teachers if t.name == spec.name)
    dp = cfg.validate_layout(split.world)
    replica, tp_rank = (split.rank - spec.first) // spec.tp, (split.rank - spec.first) % spec.tp
    served = [d for d in range(dp) if d % spec.replicas == replica]
    sender = _Sender(split.bridge, tag, cfg.fuse.prefetch, spec.name) if tp_rank == 0 else None
    dsts = {d: student_receivers(cfg, dp, d) for d in served}
    try:
        groups = init_student_groups(tp=spec.tp)          # this teacher group's own world
        backend, tok_spec = build_backend(tcfg, groups)
        teacher_tok = load_tokenizer(tok_spec, name=spec.name)
        pivot_tok = build_tokenizer(cfg)
        ds = build_sft_dataset(cfg, cfg.data.train, pivot_tok)
        order = SampleOrder(len(ds), cfg.train.seed)
        step, consumed = start_position(cfg)
        gb, mb = cfg.train.global_batch, cfg.train.micro_batch
        seq, k = cfg.model.seq_length, cfg.fuse.k
        stop = torch.zeros(1, device=groups.device)    # the teacher group's NCCL on GPU
        sent = 0
        watch = AlignmentWatch(spec.name, cfg.fuse.min_aligned_fraction,
                               cfg.fuse.min_aligned_fraction_hard, warn=tp_rank == 0)
        while step < cfg.train.steps and not stop.item():
            for d in served:
                for micro in step_microbatch_indices(order, consumed, gb, mb, dp, d):
                    samples = [ds.sample(i) for i in micro]
                    t0 = time.perf_counter()
                    res = compute_batch_topk(samples, backend, teacher_tok, pivot_tok, seq, k=k,
                                             eps=cfg.fuse.eps, alignment=cfg.fuse.alignment,
                                             max_teacher_len=None)
                    dt = time.perf_counter() - t0
                    watch.add(res)
                    if sender is not None:
                        sender.send(dsts[d], topk_message(res, [s.sample_id for s in samples], seq, k,
                                                      sum(r.teacher_tokens for r in res), dt))
                        sent += 1
            watch.check()       # every rank of the group: all stop together under the floor
            step += 1
            consumed += gb
            # all TP ranks of the replica stop together when the student has gone away
            stop.fill_(float(sender is not None and sender.student_gone))
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if sender is not None:
            sender.drain()
        return {"teacher": spec.name, "sent": sent, "step": step}
    except Exception as e:
        text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # any rank of the group: the store outlives this process (a student whose receive fails
        # reads it), then the sender also sends it in line with the batches already sent
        split.store.set(error_key(spec.name), f"(launch rank {split.rank}) {text}"[:4000])
        if sender is not None:
            sender.pending.clear()
            for d in served:
                sender.send(dsts[d], error_message(text))
            sender.drain(datetime.timedelta(seconds=cfg.fuse.timeout_s))
        raise
