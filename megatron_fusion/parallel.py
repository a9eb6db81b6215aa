"""Process groups: built once here and passed down (student TP/PP/DP, online teacher groups).

``init_distributed()`` starts torch.distributed from torchrun's environment (gloo without CUDA,
NCCL with it) and turns on CPU mode when there is no GPU. ``init_student_groups()`` builds
Megatron's model-parallel state for the student and returns a ``StudentGroups`` record whose
fields the losses and the trainer take explicitly.

Online teachers (``init_distributed(online_teachers=[(name, ranks, tp), ...])``): one torchrun
world is split as ``[student ranks..., teacher 0 ranks..., teacher 1 ranks..., ...]``. Each part
gets its *own default process group* on the launch's store (a ``PrefixStore`` per part), so
Megatron's global parallel state, dist_checkpointing and every world-wide collective of the
trainer see only the student on student ranks, and only its own group on a teacher's ranks
(where ``init_student_groups(tp=teacher.tp)`` then builds the teacher's TP group, so the Megatron
teacher backend runs unchanged). Why not one default group over everything: megatron-core 0.16
derives its groups from the default world size, and ``dist_checkpointing`` saves with world-wide
collectives, so teacher ranks in the student's default group would have to join every student
checkpoint. A third group, the ``bridge`` (gloo, all launch ranks), carries only the
point-to-point top-K messages between teachers and the student's last pipeline stage
(``megatron_fusion.teachers.online``); top-K is a few hundred bytes per position, so it travels on the CPU
even when the models run on GPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_fusion import cpu_mode


@dataclass(frozen=True)
class StudentGroups:
    """The student's process groups and this rank's coordinates in them."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device = torch.device("cpu")  # this rank's device (``rank_device()``): the
    # model's parameters, every tensor of the loop and stages, every collective's buffers

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


_DEVICE: torch.device | None = None


def rank_device() -> torch.device:
    """This rank's device, chosen once: ``cuda:LOCAL_RANK`` with CUDA, else ``cpu``.

    ``init_distributed`` fixes it (and makes it the current CUDA device); ``init_student_groups``
    hands it down in ``StudentGroups.device``, from where the loop, the stages and the online
    teacher protocol take it (docs/methods.md, "Devices and collectives").
    """
    global _DEVICE
    if _DEVICE is None:
        _DEVICE = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                   if torch.cuda.is_available() else torch.device("cpu"))
    return _DEVICE


def to_device(batch: dict, device: torch.device, host_keys: tuple = ("sample_id",)) -> dict:
    """One micro-batch moved to ``device`` once: every tensor but ``host_keys`` (host metadata).

    On CUDA the host tensors are pinned and copied with ``non_blocking=True`` (the copies overlap
    the step's work; the stream orders them before any kernel reading them).
    """
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and k not in host_keys and v.device != device:
            if pin and v.device.type == "cpu":
                v = v.pin_memory()
            v = v.to(device, non_blocking=pin)
        out[k] = v
    return out


@dataclass(frozen=True)
class TeacherGroupSpec:
    """One online teacher's ranks in the launch world: ``first .. first + ranks - 1``."""

    name: str
    first: int
    ranks: int
    tp: int

    @property
    def replicas(self) -> int:
        """Data-parallel copies of the teacher (Megatron order: TP groups are consecutive)."""
        return self.ranks // self.tp


@dataclass(frozen=True)
class WorldSplit:
    """The launch world split into the student and online teacher groups (see module doc)."""

    world: int                              # all launch ranks
    rank: int                               # this process's launch rank
    student: int                            # launch ranks 0 .. student-1 are the student
    teachers: tuple[TeacherGroupSpec, ...]
    bridge: dist.ProcessGroup               # gloo over all launch ranks, p2p only
    store: dist.Store                       # the launch's store: teachers post their errors here

    @property
    def teacher(self) -> TeacherGroupSpec | None:
        """The teacher group this rank belongs to (None on student ranks)."""
        return next((t for t in self.teachers if t.first <= self.rank < t.first + t.ranks), None)


_SPLIT: WorldSplit | None = None


def world_split() -> WorldSplit | None:
    """The split made by ``init_distributed(online_teachers=...)``; None without online teachers."""
    return _SPLIT


def launch_world_size() -> int:
    """Ranks of the whole launch (student + online teachers); the default world without them."""
    return _SPLIT.world if _SPLIT is not None else dist.get_world_size()


def init_distributed(timeout_s: float = 600.0,
                     online_teachers: list[tuple[str, int, int]] | tuple = ()) -> None:
    """Initialise torch.distributed from torchrun's env (RANK, WORLD_SIZE, MASTER_*).

    ``online_teachers``: ``(name, ranks, tp)`` per online teacher, in config order; the last
    ``sum(ranks)`` launch ranks become the teacher groups and the default process group of each
    part covers only that part (module docstring).
    """
    cpu_mode.enable()
    if dist.is_initialized():
        return
    if rank_device().type == "cuda":
        torch.cuda.set_device(rank_device())
    if "RANK" not in os.environ:  # a plain `python -m ...` run: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not online_teachers:
        dist.init_process_group(backend(), timeout=timeout)
        return
    _init_split(list(online_teachers), timeout)


def _init_split(online_teachers: list[tuple[str, int, int]], timeout) -> None:
    global _SPLIT
    from torch.distributed.rendezvous import rendezvous

    # torchrun's store (or a new one on rank 0 outside torchrun), shared by all parts
    store, rank, world = next(rendezvous("env://", timeout=timeout))
    student = world - sum(r for _, r, _ in online_teachers)
    if student < 1:
        raise ValueError(f"parallel: online teachers need {world - student} ranks, the launch "
                         f"has {world}")
    specs, first = [], student
    for name, ranks, tp in online_teachers:
        if ranks < tp or ranks % tp:
            raise ValueError(f"parallel: teacher {name}: ranks={ranks} is not a multiple of "
                             f"tp={tp}")
        specs.append(TeacherGroupSpec(name, first, ranks, tp))
        first += ranks
    mine = next((t for t in specs if t.first <= rank < t.first + t.ranks), None)
    if mine is None:
        dist.init_process_group(backend(), store=dist.PrefixStore("student/", store), rank=rank,
                                world_size=student, timeout=timeout)
    else:
        dist.init_process_group(backend(), store=dist.PrefixStore(f"teacher/{mine.name}/", store),
                                rank=rank - mine.first, world_size=mine.ranks, timeout=timeout)
    bridge = dist.ProcessGroupGloo(dist.PrefixStore("bridge/", store), rank, world, timeout)
    _SPLIT = WorldSplit(world, rank, student, tuple(specs), bridge,
                        dist.PrefixStore("online/", store))


def init_student_groups(tp: int = 1, pp: int = 1, vpp: int | None = None) -> StudentGroups:
    """Build Megatron's model-parallel state (order tp-cp-ep-dp-pp) and return the groups
    (with this rank's ``rank_device()``)."""
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"parallel: world size {world} is not divisible by tp*pp = {tp * pp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        create_gloo_process_groups=False,
    )
    return StudentGroups(
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=rank_device(),
    )


def destroy_student_groups() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
