"""The tiny recipes' data: synthetic SFT tasks, preference pairs and a SentencePiece pivot.

    python -m demos.data [--out runs/demo_data] [--n-train 2000] [--seed 0]

The maker is ``megatron_fusion.data.tiny.make_demo_data`` (the trainer also calls it on first use
of configs/test/tiny_cpu.yaml, and the tests build their data with it).
"""

from __future__ import annotations

import argparse

from megatron_fusion.data.tiny import DEMO_DATA_DIR, make_demo_data

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEMO_DATA_DIR))
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for k, v in make_demo_data(args.out, n_train=args.n_train, seed=args.seed).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
