"""Render and run the per-node torchrun command for launch/*.sh (Slurm) and launch/run_local.sh.

    python -m megatron_fusion.launcher torchrun [--dry-run] [-- dotted.key=value ...]

Runs once per node (under ``srun --ntasks-per-node=1``): reads the launcher's environment knobs,
checks the layout the same way ``megatron-fusion plan`` does, and runs torchrun's agent in this
process (``megatron_fusion.supervise``: a rank that dies is named by its role) as

    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint MASTER:PORT
             --rdzv-id JOB -m megatron_fusion.train --config CONFIG stage=.. run.dir=.. ...

Knobs (environment): CONFIG (required), STAGE, RUN_DIR, RUN_NAME, NODES (default
SLURM_JOB_NUM_NODES, else 1), GPUS_PER_NODE (default SLURM_GPUS_ON_NODE, else 8), TEACHER_NODES
(spread over the online teachers, see ``plan.split_teacher_ranks``), MASTER_ADDR, MASTER_PORT,
SLURM_JOB_ID (rendezvous id), LOG_DIR (per-rank torchrun logs), WANDB_MODE / WANDB_PROJECT /
WANDB_ENTITY (passed as logging.* overrides), WANDB_RUN_ID (default: derived from run.dir, so
a requeued or resubmitted job continues the same W&B run) and WANDB_RESUME (default allow).
``--dry-run`` prints the environment it adds and the command instead of running it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from megatron_fusion.config import Config, ConfigError, load_config

DEFAULT_GPUS_PER_NODE = 8
DEFAULT_MASTER_PORT = 29500


@dataclass
class NodeLaunch:
    argv: list[str]          # the torchrun command line
    env: dict[str, str]      # variables added to the environment of torchrun and the ranks
    cfg: Optional[Config] = None   # the resolved config (names failed ranks by role)
    world: int = 0                 # ranks of the whole launch (nodes x GPUs per node)


def _int(env: Mapping[str, str], name: str, default: Optional[int]) -> int:
    raw = env.get(name, "")
    if raw == "":
        if default is None:
            raise ConfigError(name, "must be set")
        return default
    if not raw.isdigit():
        raise ConfigError(name, f"expected a non-negative integer, got {raw!r}")
    return int(raw)


def _gpus_on_node(env: Mapping[str, str]) -> int:
    if env.get("GPUS_PER_NODE"):
        return _int(env, "GPUS_PER_NODE", None)
    slurm = env.get("SLURM_GPUS_ON_NODE", "")
    return int(slurm) if slurm.isdigit() else DEFAULT_GPUS_PER_NODE


def wandb_run_id(run_dir: str, name: Optional[str]) -> str:
    """A W&B run id that is the same for every job on the same run directory."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name or Path(run_dir).name).strip("-")[:40] or "run"
    return f"{slug}-{digest}"


def render(env: Mapping[str, str], extra: list[str]) -> NodeLaunch:
    """The torchrun command for one node, from the launcher's environment and extra overrides."""
    config = env.get("CONFIG", "")
    if not config:
        raise ConfigError("CONFIG", "must name a config file (e.g. configs/recipes/fuse_14b.yaml)")
    nodes = _int(env, "NODES", _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1)))
    gpus = _gpus_on_node(env)
    overrides: list[str] = []
    if env.get("STAGE"):
        overrides.append(f"stage={env['STAGE']}")
    if env.get("RUN_DIR"):
        overrides.append(f"run.dir={env['RUN_DIR']}")
    if env.get("RUN_NAME"):
        overrides.append(f"run.name={env['RUN_NAME']}")
    for var, key in (("WANDB_MODE", "logging.wandb_mode"), ("WANDB_PROJECT", "logging.wandb_project"),
                     ("WANDB_ENTITY", "logging.wandb_entity")):
        if env.get(var):
            overrides.append(f"{key}={env[var]}")
    overrides += extra
    cfg = load_config(config, overrides)
    if env.get("TEACHER_NODES", "") != "":
        from megatron_fusion.plan import teacher_rank_overrides

        teacher = teacher_rank_overrides(cfg, _int(env, "TEACHER_NODES", None), nodes, gpus)
        # before the user's overrides, so an explicit fuse.teachers.<i>.ranks=... still wins
        overrides = overrides[:len(overrides) - len(extra)] + teacher + extra
        cfg = load_config(config, overrides)
    _check(cfg, nodes, gpus)

    argv = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={gpus}"]
    if nodes == 1:
        argv.append("--standalone")
    else:
        master = env.get("MASTER_ADDR", "")
        if not master:
            raise ConfigError("MASTER_ADDR", "must be set for a multi-node launch (first node's host name)")
        port = _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master}:{port}",
                 f"--rdzv-id={env.get('SLURM_JOB_ID') or 'megatron-fusion'}"]
    argv.append("--max-restarts=0")     # a failed rank fails the job; Slurm requeue resumes it
    if env.get("LOG_DIR"):
        argv += [f"--log-dir={env['LOG_DIR']}/torchrun", "--tee=3"]
    argv += ["-m", "megatron_fusion.train", "--config", config, *overrides]

    added = {"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or "8",
             "WANDB_RUN_ID": env.get("WANDB_RUN_ID") or wandb_run_id(cfg.run.dir, cfg.run.name),
             "WANDB_RESUME": env.get("WANDB_RESUME") or "allow"}
    return NodeLaunch(argv, added, cfg, nodes * gpus)


def _check(cfg, nodes: int, gpus: int) -> None:
    """The plan's layout checks (divisibility, teacher groups); memory is plan's business."""
    from megatron_fusion.plan import check_layout

    check_layout(cfg, nodes, gpus)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_fusion.launcher")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("torchrun", help="run (or print) this node's torchrun command")
    tr.add_argument("--dry-run", action="store_true")
    tr.add_argument("overrides", nargs="*", help="dotted.key=value (after --)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        node = render(os.environ, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.dry_run:
        for k, v in node.env.items():
            print(f"export {k}={shlex.quote(v)}")
        print(shlex.join(node.argv))
        return 0
    sys.stdout.flush()
    # torchrun's agent (in this process) must survive the SIGUSR1 that the batch script forwards
    # before the time limit; the ranks inherit the ignored signal and install their own handler
    # (megatron_fusion.train saves a checkpoint and exits at the next step boundary).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.environ.update(node.env)
    from megatron_fusion.supervise import run_torchrun

    return run_torchrun(node.argv[1:], node.cfg, node.world)


if __name__ == "__main__":
    sys.exit(main())
