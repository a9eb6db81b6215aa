"""The local multi-rank runner: run a function on N gloo ranks on CPU (N <= 4, one thread each).

Starting ranks and importing Megatron costs 7-15 s on the 2-core machine, so a test should run
*many* checks in one launch: ``fn`` may do all of them and return a picklable result per rank.

    results = run_on_ranks(my_checks, world_size=2, args=(...))   # list, one entry per rank

``fn(rank, world_size, *args)`` must be importable (module level). torch.distributed is already
initialised (gloo) and CPU mode is on when it runs. An exception on any rank is re-raised in the
caller with that rank's traceback; a rank that hangs past ``timeout_s`` fails the call.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_q, env):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        from megatron_fusion.parallel import init_distributed

        init_distributed(timeout_s=120)
        result = fn(rank, world_size, *args)
        # Serialise by value: tensors put on an mp queue travel as shared-memory handles that
        # die with this process, which may exit before the parent reads them.
        buf = io.BytesIO()
        torch.save(result, buf)
        out_q.put((rank, "ok", buf.getvalue()))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report everything, including SystemExit from the code under test
        out_q.put((rank, "error", traceback.format_exc()))


def run_on_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), *,
                 timeout_s: float = 300.0, env: dict | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results."""
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be in 1..8, got {world_size}")
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_q, env or {}),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, status, payload = out_q.get(timeout=timeout_s)
            except queue.Empty:
                errors.append(f"timeout: no answer from some ranks within {timeout_s:.0f}s")
                break
            if status == "ok":
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} failed ---\n{payload}")
                break  # other ranks are likely blocked in a collective; stop them
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
