"""Process groups: built once here and passed down (student TP/PP/DP; teacher groups later).

``init_distributed()`` starts torch.distributed from torchrun's environment (gloo without CUDA,
NCCL with it) and turns on CPU mode when there is no GPU. ``init_student_groups()`` builds
Megatron's model-parallel state for the student and returns a ``StudentGroups`` record whose
fields the losses and the trainer take explicitly.
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

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed from torchrun's env (RANK, WORLD_SIZE, MASTER_*)."""
    cpu_mode.enable()
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:  # a plain `python -m ...` run: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend(), timeout=datetime.timedelta(seconds=timeout_s))


def init_student_groups(tp: int = 1, pp: int = 1, vpp: int | None = None) -> StudentGroups:
    """Build Megatron's model-parallel state (order tp-cp-ep-dp-pp) and return the groups."""
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
