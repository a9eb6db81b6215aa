"""The `megatron-fusion` command.

    megatron-fusion train --config configs/tiny_cpu.yaml [--nproc N] [dotted.key=value ...]
    megatron-fusion plan  --config configs/fuse_14b.yaml --nodes 4 --gpus-per-node 8

`train` starts torchrun's agent itself (``--nproc``; default: as many ranks as the config
needs), runs ``python -m megatron_fusion.train`` on every rank, and names a rank that dies by its
role (student, or which teacher: ``megatron_fusion.supervise``).
"""

from __future__ import annotations

import argparse
import os
import sys


def _train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-fusion train")
    ap.add_argument("--config", required=True)
    ap.add_argument("--nproc", type=int, default=None,
                    help="ranks to start (default: what the config needs: tp*pp + online teacher ranks)")
    args, overrides = ap.parse_known_args(argv)
    from megatron_fusion.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides)
        nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp + cfg.online_teacher_ranks()
        cfg.validate_layout(nproc)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from megatron_fusion.supervise import run_torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "megatron_fusion.train",
                         "--config", args.config, *overrides], cfg, nproc)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _train(rest)
    if cmd == "plan":
        from megatron_fusion.plan import main as plan_main

        return plan_main(rest)
    print(f"megatron-fusion: unknown command {cmd!r} (train, plan)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
