"""Run the launch's ranks under torchrun's agent and name a failed rank by its role.

``megatron-fusion train`` and ``python -m megatron_fusion.launcher torchrun`` (one per node under
Slurm) both start their ranks through ``run_torchrun``: torchrun's own agent
(``torch.distributed.run``) runs in this process, so rendezvous, log redirection, teardown and
exit codes are torchrun's. What it adds: when a rank dies (non-zero exit, or a signal such as
the kernel's OOM SIGKILL), torchrun tears the launch down and reports ``rank: 3 ... exitcode: -9``;
this module catches that failure and prints one line per failed rank naming its role, e.g.

    error: teacher qwen_coder (launch rank 3: tp rank 1 of replica 0) was killed by SIGKILL
           (out of memory?); the student stopped; its last checkpoint is kept

A teacher that raises or hangs is reported by the student itself (``megatron_fusion.teachers.online``);
this covers the deaths no in-process handler sees.
"""

from __future__ import annotations

import os
import signal
import sys

from megatron_fusion.config import Config
from megatron_fusion.run_guard import PARENT_PID_ENV


def rank_roles(cfg: Config, world: int) -> list[str]:
    """Role of every launch rank: student (Megatron order tp-cp-ep-dp-pp), then online teachers
    in config order (``megatron_fusion.parallel.init_distributed``)."""
    online = cfg.online_teachers()
    student = cfg.student_world_size(world)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = max(student // (tp * pp), 1)
    roles = [f"student (tp rank {r % tp}, dp rank {(r // tp) % dp}, pp stage {r // (tp * dp)})"
             for r in range(max(student, 0))]
    for t in online:
        roles += [f"teacher {t.name} (tp rank {i % t.tp} of replica {i // t.tp})"
                  for i in range(t.ranks)]
    return roles


def describe(rank: int, exitcode: int, roles: list[str]) -> str:
    """One line for a failed rank: its role, its launch rank, and how it ended."""
    role = roles[rank] if 0 <= rank < len(roles) else "rank outside the config's layout"
    name, _, detail = role.partition(" (")
    where = f"{name} (launch rank {rank}: {detail}" if detail else f"{name} (launch rank {rank})"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = f"signal {-exitcode}"
        how = f"was killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
    else:
        how = f"exited with code {exitcode}"
    return f"{where} {how}"


def failure_report(failures: dict[int, int], first: int, roles: list[str]) -> list[str]:
    """Lines for ``{launch rank: exit code}``; ``first`` (torchrun's root cause) leads, and a
    teacher's death is said to have stopped the student."""
    order = [first] + sorted(r for r in failures if r != first)
    lines = [f"error: {describe(r, failures[r], roles)}" for r in order]
    if roles[first:first + 1] and roles[first].startswith("teacher "):
        lines[0] += "; the student was stopped; its last checkpoint is kept"
    return lines


def run_torchrun(torchrun_args: list[str], cfg: Config, world: int) -> int:
    """``torchrun *torchrun_args`` in this process; 0, or 1 after naming the failed ranks."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # the agent runs here and starts the ranks as our children: a rank's run_guard.die_with_parent
    # checks that its parent is still this process (we may die before its prctl)
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as e:
        failures = e.failures
    else:
        return 0
    roles = rank_roles(cfg, world)
    # torchrun's root cause is the earliest timestamp (whole seconds, so ties are common):
    # among ties a death by signal, then a teacher, goes first
    first = min(failures, key=lambda r: (failures[r].timestamp, failures[r].exitcode >= 0,
                                         not roles[r:r + 1] or not roles[r].startswith("teacher "),
                                         r))
    print("\n".join(failure_report({r: f.exitcode for r, f in failures.items()}, first, roles)),
          file=sys.stderr, flush=True)
    return 1
