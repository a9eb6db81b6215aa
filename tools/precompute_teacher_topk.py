"""Precompute one teacher's standardised top-K at the pivot's response positions (SPEC §6).

    python tools/precompute_teacher_topk.py --data sft.jsonl --pivot-tokenizer pivot/ \
        --teacher-model teacher/ --teacher-name t0 --out runs/topk/t0 --seq-len 2048

Resumable: re-run the same command after a kill; finished shards are skipped. Logic and the
backend interface live in megatron_fusion/teacher_topk.py.
"""

from megatron_fusion.teacher_topk import cli_main

if __name__ == "__main__":
    cli_main()
