"""Precompute one teacher's standardised top-K at the pivot's response positions (docs/methods.md §6).

    python tools/precompute_teacher_topk.py --data sft.jsonl --pivot-tokenizer pivot/ \
        --teacher-model teacher/ --teacher-name t0 --out runs/topk/t0 --seq-len 2048

On a GPU the HF teacher loads onto cuda:LOCAL_RANK in bf16 by default (explicitly:
``--device cuda --dtype bf16``; ``--device cpu --dtype fp32`` for the CPU reference). What the shards
store is ``--shard-dtype``: ``logp16`` (default, format 4: the teacher's top-K log-probs, which
``fuse.loss: hybrid`` needs, and the standardised values derived from them) or ``bfloat16`` /
``float16`` (format 3: standardised values only, enough for ``uld``).

A teacher that is a megatron-fusion run (config.yaml + checkpoint), tensor-parallel over the ranks:

    torchrun --nproc-per-node 2 tools/precompute_teacher_topk.py --backend megatron \
        --checkpoint runs/teacher_run --data sft.jsonl --pivot-tokenizer pivot/ \
        --teacher-name t1 --out runs/topk/t1 --seq-len 2048

Resumable: re-run the same command after a kill; finished shards are skipped. The body is ``megatron-fusion precompute-topk`` (megatron_fusion/cli.py); this file is a thin wrapper.
"""

import sys

from megatron_fusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['precompute-topk', *sys.argv[1:]]))
