"""Online teachers: teacher ranks beside the student stream aligned top-K to it (SPEC §1, §6).

    megatron-fusion train --config configs/demo_cpu_online.yaml   # student + teacher ranks

One torchrun world, split by ``megatron_fusion.parallel.init_distributed(online_teachers=...)``
into ``[student ranks..., teacher 0 ranks..., ...]``; each part has its own default process
group, so the student's Megatron state and checkpoints see only the student, and a teacher's
ranks see only their group: ``init_student_groups(tp=teacher.tp)`` there builds the teacher's
TP group and the teacher backend runs unchanged (``_build_backend``): ``backend: megatron``
(a megatron-fusion run, sharded at the teacher's TP) or ``backend: hf`` (a transformers model;
not tensor-parallel, so at ``tp > 1`` every rank holds the full model and keeps its vocab shard of
the logits). Why the split rather than one Megatron state over all ranks: ``parallel.py``.

Teacher loop (``run_teacher``): from the student's data position (its latest checkpoint's
``consumed`` on resume, else 0) it walks the same ``SampleOrder`` (seed, global batch, DP split,
micro-batches) as ``train.rank_microbatches``; each teacher DP replica serves the student DP ranks
``d`` with ``d % replicas == replica``. Per micro-batch all TP ranks of the replica run
``compute_batch_topk`` (distributed top-K over the teacher's vocab shards, alignment to pivot
positions), and TP rank 0 sends the result to every student rank of the last pipeline stage of
that DP rank. Gloo sends complete only when the student posts the matching receive, so the
teacher keeps at most ``fuse.prefetch`` micro-batches computed ahead and then waits.

Message per micro-batch (bridge group, point-to-point, tag = teacher index): a header int64[8]
``[status, b, s, K, msg_len, fingerprint, teacher_tokens, compute_us]``, then values [b, s, K] as
bf16 bits (int16; the offline shards' dtype, so both paths give the same tensors), ids [b, s, K]
int32, aligned [b, s] uint8, teacher CE [b] float32. Never a full-vocabulary tensor. A teacher
that raises posts its message in the launch's store (read by a student whose receive fails) and
sends ``status = ERROR`` with the message; a teacher that dies closes its connections; one that
hangs trips ``fuse.timeout_s``: each ends the student's run with an error naming the teacher.
A fingerprint that does not match the student's micro-batch is a ``TeacherDataError``.
"""

from __future__ import annotations

import datetime
import json
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_fusion.config import Config, TeacherConfig
from megatron_fusion.parallel import TeacherGroupSpec, WorldSplit
from megatron_fusion.errors import TeacherDataError
from megatron_fusion.stages.fuse import batch_fingerprint


class TeacherFailedError(TeacherDataError):
    """An online teacher raised, died or timed out (one line naming it; user-facing)."""

OK, ERROR = 1, 2
HEADER = 8
EPS = 1e-6               # SPEC §2 default, as tools/precompute_teacher_topk.py
ALIGNMENT = "offset"     # SPEC §1 default, as tools/precompute_teacher_topk.py


def error_key(teacher: str) -> str:
    """Store key where a failing teacher rank posts its one-line error."""
    return f"error/{teacher}"


def _fp_to_int(fp: str) -> int:
    v = int(fp, 16)                                     # 64-bit fingerprint as a signed int64
    return v - (1 << 64) if v >= 1 << 63 else v


def _int_to_fp(v: int) -> str:
    return f"{v % (1 << 64):016x}"


def student_receivers(cfg: Config, dp: int, dp_rank: int) -> list[int]:
    """Launch ranks of the student's last pipeline stage for DP rank ``dp_rank`` (Megatron's
    order tp-cp-ep-dp-pp: rank = tp_rank + tp * dp_rank + tp * dp * pp_rank)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    return [t + tp * dp_rank + tp * dp * (pp - 1) for t in range(tp)]


def start_position(cfg: Config) -> tuple[int, int]:
    """(step, consumed samples) the student starts from: its latest checkpoint on resume."""
    from megatron_fusion import checkpoint as ckpt

    latest = (ckpt.latest_checkpoint(Path(cfg.run.dir) / "checkpoints")
              if cfg.checkpoint.resume else None)
    if latest is None:
        return 0, 0
    meta = json.loads((latest / "meta.json").read_text())
    return int(meta["step"]), int(meta["consumed"])


# --- student side ----------------------------------------------------------------------------

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
        """-> values [b,s,K] f32, ids [b,s,K] i64, aligned [b,s] bool, teacher_ce [b] f32."""
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
        values = self._recv(torch.empty(b, s, k, dtype=torch.int16))
        ids = self._recv(torch.empty(b, s, k, dtype=torch.int32))
        aligned = self._recv(torch.empty(b, s, dtype=torch.uint8))
        ce = self._recv(torch.empty(b, dtype=torch.float32))
        self.wait_s += time.perf_counter() - t0
        self.tokens += h[6]
        self.compute_s += h[7] / 1e6
        want = batch_fingerprint(sample_ids)
        if _int_to_fp(h[5]) != want:
            raise TeacherDataError(
                f"teacher {self.name}: top-K for batch {_int_to_fp(h[5])} arrived for the "
                f"student's batch {want} (fingerprint mismatch: the teacher reads another sample "
                "order; same data.train, train.seed, train.global_batch and run.dir?)")
        return (values.view(torch.bfloat16).float(), ids.long(), aligned.bool(), ce)

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


# --- teacher side ----------------------------------------------------------------------------

def _build_backend(tcfg: TeacherConfig, groups):
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
        from megatron_fusion.teachers.backends import VocabShardedBackend, open_backend, rank_device

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


def _message(res: list, sample_ids: list[int], seq: int, k: int, tokens: int, compute_s: float):
    b = len(res)
    values = torch.zeros(b, seq, k, dtype=torch.bfloat16)                  # [b, s, K]
    ids = torch.zeros(b, seq, k, dtype=torch.int32)                         # [b, s, K]
    aligned = torch.zeros(b, seq, dtype=torch.uint8)                        # [b, s]
    for r, st in enumerate(res):
        n = min(st.values.shape[0], seq)
        values[r, :n] = st.values[:n].to(torch.bfloat16)
        ids[r, :n] = st.ids[:n].to(torch.int32)
        aligned[r, :n] = st.aligned_mask[:n].to(torch.uint8)
    ce = torch.tensor([st.teacher_ce for st in res], dtype=torch.float32)   # [b]
    fp = _fp_to_int(batch_fingerprint(torch.tensor(sample_ids)))
    header = torch.tensor([OK, b, seq, k, 0, fp, tokens, int(compute_s * 1e6)], dtype=torch.long)
    return [header, values.view(torch.int16), ids, aligned, ce]


def _error_message(text: str) -> list[torch.Tensor]:
    body = torch.tensor(list(text.encode()[:4000]), dtype=torch.uint8)
    return [torch.tensor([ERROR, 0, 0, 0, body.numel(), 0, 0, 0], dtype=torch.long), body]


def run_teacher(cfg: Config, split: WorldSplit) -> dict:
    """The teacher loop on this teacher rank (module doc); returns a small summary."""
    from megatron_fusion.parallel import init_student_groups
    from megatron_fusion.teachers.topk import compute_batch_topk
    from megatron_fusion.tokenizers import load_tokenizer
    from megatron_fusion.train import SampleOrder, build_sft_dataset, build_tokenizer

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
        backend, tok_spec = _build_backend(tcfg, groups)
        teacher_tok = load_tokenizer(tok_spec, name=spec.name)
        pivot_tok = build_tokenizer(cfg)
        ds = build_sft_dataset(cfg, cfg.data.train, pivot_tok)
        order = SampleOrder(len(ds), cfg.train.seed)
        step, consumed = start_position(cfg)
        gb, mb = cfg.train.global_batch, cfg.train.micro_batch
        seq, k = cfg.model.seq_length, cfg.fuse.k
        per_rank = gb // dp
        stop = torch.zeros(1, device=groups.device)    # the teacher group's NCCL on GPU
        sent = 0
        while step < cfg.train.steps and not stop.item():
            for d in served:
                idx = order.indices(consumed + d * per_rank, per_rank)
                for j in range(0, per_rank, mb):
                    samples = [ds.sample(i) for i in idx[j:j + mb]]
                    t0 = time.perf_counter()
                    res = compute_batch_topk(samples, backend, teacher_tok, pivot_tok, seq, k=k,
                                             eps=EPS, alignment=ALIGNMENT, max_teacher_len=None)
                    dt = time.perf_counter() - t0
                    if sender is not None:
                        sender.send(dsts[d], _message(res, [s.sample_id for s in samples], seq, k,
                                                      sum(r.teacher_tokens for r in res), dt))
                        sent += 1
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
                sender.send(dsts[d], _error_message(text))
            sender.drain(datetime.timedelta(seconds=cfg.fuse.timeout_s))
        raise
